"""The converted tokenizers load without remote code and encode/decode exactly like InternVL2.5's reference classes.

Reference outputs (transformers 4.37.2 `InternLM2Tokenizer` / `Qwen2Tokenizer`, slow, as InternVL loads them) are in
`fixtures/*/expected.json` and `tokenizer_expected.json`. Every check runs on the folder written by `save_pretrained`
and reloaded with `AutoTokenizer`, which is what a checkpoint user gets.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import import_protobuf

from armor.convert_tokenizer import (
    IMGBOS_TOKEN,
    IMGEND_TOKEN,
    IMGPAD_TOKEN,
    check_special_token_ids,
    convert_tokenizer,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARMOR_TOKENS = (IMGBOS_TOKEN, IMGEND_TOKEN, IMGPAD_TOKEN)
INTERNLM2_TINY = FIXTURES / "internlm2-tokenizer-tiny"
INTERNLM2_MODEL = FIXTURES / "internvl2_5-tiny-internlm2"
QWEN2_MODEL = FIXTURES / "internvl2_5-tiny-qwen2"
SOURCES = {
    "internlm2-tokenizer-tiny": (INTERNLM2_TINY, "expected.json"),
    "internvl2_5-tiny-internlm2": (INTERNLM2_MODEL, "tokenizer_expected.json"),
    "internvl2_5-tiny-qwen2": (QWEN2_MODEL, "tokenizer_expected.json"),
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def llm_vocab_size(name: str) -> int:
    """V: the model config's `llm_config.vocab_size`; the stand-alone tokenizer fixture states its length instead."""
    source, expected_file = SOURCES[name]
    if (source / "config.json").is_file():
        return read_json(source / "config.json")["llm_config"]["vocab_size"]
    return read_json(source / expected_file)["meta"]["len_tokenizer"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple]:
    """name -> (tokenizer reloaded with AutoTokenizer from the saved folder, saved folder, reference data)."""
    result = {}
    for name, (source, expected_file) in SOURCES.items():
        folder = tmp_path_factory.mktemp(name) / "tokenizer"
        convert_tokenizer(source, llm_vocab_size(name)).save_pretrained(folder)
        result[name] = (AutoTokenizer.from_pretrained(folder), folder, read_json(source / expected_file))
    return result


def mismatches(tokenizer, cases: list[dict], fields: tuple[str, ...]) -> list[str]:
    """Every (case, field) whose value differs from the reference, so a failure lists them all."""
    computed = {
        "ids": lambda case: tokenizer.encode(case["text"]),
        "ids_no_special": lambda case: tokenizer.encode(case["text"], add_special_tokens=False),
        "tokens_no_special": lambda case: tokenizer.convert_ids_to_tokens(case["ids_no_special"]),
        "decode": lambda case: tokenizer.decode(case["ids"]),
        "decode_skip_special": lambda case: tokenizer.decode(case["ids"], skip_special_tokens=True),
    }
    return [
        f"{case['name']}.{field}: got {computed[field](case)!r}, reference {case[field]!r}"
        for case in cases
        for field in fields
        if computed[field](case) != case[field]
    ]


@pytest.mark.parametrize("name", SOURCES)
def test_saved_folder_loads_a_builtin_class_without_remote_code(saved, name):
    tokenizer, folder, _ = saved[name]
    config = read_json(folder / "tokenizer_config.json")
    assert "auto_map" not in config
    assert not list(folder.glob("*.py"))
    assert type(tokenizer).__module__.startswith("transformers.")
    expected_class = "Qwen2Tokenizer" if "qwen2" in name else "TokenizersBackend"
    assert config["tokenizer_class"] == type(tokenizer).__name__ == expected_class


@pytest.mark.parametrize("name", SOURCES)
def test_chat_template_and_max_length_are_carried_over(saved, name):
    tokenizer = saved[name][0]
    source_config = read_json(SOURCES[name][0] / "tokenizer_config.json")
    assert tokenizer.chat_template == source_config.get("chat_template")
    assert tokenizer.model_max_length == source_config["model_max_length"] == 16384


@pytest.mark.parametrize("name", SOURCES)
def test_every_reference_case_encodes_to_the_same_ids(saved, name):
    tokenizer, _, reference = saved[name]
    assert len(reference["cases"]) in (34, 45)
    assert mismatches(tokenizer, reference["cases"], ("ids", "ids_no_special", "tokens_no_special")) == []


@pytest.mark.parametrize("name", SOURCES)
def test_every_reference_case_decodes_to_the_same_string(saved, name):
    """Decoding the reference ids. For InternLM2 this covers the reference quirks: a leading " <s>", spaces around
    special tokens, punctuation clean-up."""
    tokenizer, _, reference = saved[name]
    assert mismatches(tokenizer, reference["cases"], ("decode", "decode_skip_special")) == []


@pytest.mark.parametrize("name", SOURCES)
def test_reference_special_tokens_keep_their_ids(saved, name):
    """The ids of the model fixture's `special_tokens_and_meta.json` and of the tokenizer reference's meta."""
    tokenizer, _, reference = saved[name]
    model_meta = SOURCES[name][0] / "special_tokens_and_meta.json"
    special_ids = dict(reference["meta"]["special_token_ids"])
    if model_meta.is_file():
        special_ids.update(read_json(model_meta)["special_token_ids"])
        assert len(special_ids) == len(reference["meta"]["special_token_ids"])  # the two files agree
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in special_ids} == special_ids
    assert {token: tokenizer.encode(token, add_special_tokens=False) for token in special_ids} == {
        token: [index] for token, index in special_ids.items()
    }
    meta = reference["meta"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        meta["bos_token_id"],
        meta["eos_token_id"],
        meta["pad_token_id"],
    )
    assert tokenizer.vocab_size == meta.get("sp_piece_size", meta.get("vocab_size"))


@pytest.mark.parametrize("name", SOURCES)
def test_armor_tokens_follow_the_llm_vocabulary(saved, name):
    tokenizer = saved[name][0]
    vocab_size = llm_vocab_size(name)
    assert len(tokenizer) == vocab_size + 3
    assert [tokenizer.convert_tokens_to_ids(token) for token in ARMOR_TOKENS] == [
        vocab_size,
        vocab_size + 1,
        vocab_size + 2,
    ]
    assert tokenizer.encode("".join(ARMOR_TOKENS), add_special_tokens=False) == [
        vocab_size,
        vocab_size + 1,
        vocab_size + 2,
    ]
    assert set(ARMOR_TOKENS) <= set(tokenizer.all_special_tokens)
    text_ids = tokenizer.encode("a cat", add_special_tokens=False)
    assert tokenizer.decode(text_ids + [vocab_size, vocab_size + 2, vocab_size + 1], skip_special_tokens=True) == (
        tokenizer.decode(text_ids, skip_special_tokens=True)
    )


@pytest.mark.parametrize("name", ["internlm2-tokenizer-tiny", "internvl2_5-tiny-internlm2"])
def test_internlm2_armor_tokens_are_spaced_like_internvl_tokens(saved, name):
    """<imgbos> etc. sit past the sentencepiece vocabulary like <img>, so the reference would join them with spaces."""
    tokenizer = saved[name][0]
    vocab_size = llm_vocab_size(name)
    img_ids = tokenizer.encode("x<img>y", add_special_tokens=False)
    imgbos_ids = tokenizer.encode(f"x{IMGBOS_TOKEN}y", add_special_tokens=False)
    assert imgbos_ids == [img_ids[0], vocab_size, img_ids[2]]
    assert tokenizer.decode(img_ids) == "x <img> y"
    assert tokenizer.decode(imgbos_ids) == f"x {IMGBOS_TOKEN} y"


def test_internlm2_plain_text_encodes_like_sentencepiece(saved):
    """Seeded random strings without special tokens: ids equal the reference's own sentencepiece model."""
    sentencepiece = pytest.importorskip("sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(INTERNLM2_TINY / "tokenizer.model"))
    tokenizer = saved["internlm2-tokenizer-tiny"][0]
    alphabet = list("ab xyz.,?!'\n\t\r0123") + [
        "    ",
        "▁",
        "你好",
        "天气",
        "é",
        "😀",
        "ꙮ",
        "\u00a0",
        "[UNUSED_TOKEN_3]",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(2000)]
    differing = [text for text in texts if tokenizer.encode(text, add_special_tokens=False) != processor.encode(text)]
    assert differing == []


def test_qwen2_chat_template_examples_match_reference(saved):
    tokenizer, _, reference = saved["internvl2_5-tiny-qwen2"]
    examples = reference["meta"]["chat_template_examples"]
    assert len(examples) == 3
    for example in examples:
        kwargs = {"add_generation_prompt": example["add_generation_prompt"]}
        assert tokenizer.apply_chat_template(example["messages"], tokenize=False, **kwargs) == example["text"]
        assert tokenizer(example["text"], add_special_tokens=False)["input_ids"] == example["ids"]
        assert tokenizer.encode(example["text"]) == example["ids"]


def test_folder_without_tokenizer_files_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer PATH"):
        convert_tokenizer(tmp_path, 1009)


def test_unknown_tokenizer_class_is_refused(tmp_path):
    shutil.copy(INTERNLM2_TINY / "tokenizer.model", tmp_path / "tokenizer.model")
    config = read_json(INTERNLM2_TINY / "tokenizer_config.json")
    config["tokenizer_class"] = "BertTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported tokenizer.*'BertTokenizer'"):
        convert_tokenizer(tmp_path, 1659)


@pytest.mark.parametrize("source, vocab_size, length", [(INTERNLM2_MODEL, 1008, 1009), (QWEN2_MODEL, 1015, 1012)])
def test_vocab_size_mismatch_names_both_numbers(source, vocab_size, length):
    with pytest.raises(ValueError, match=f"has {length} tokens but the model's llm_config.vocab_size is {vocab_size}"):
        convert_tokenizer(source, vocab_size)


def test_sentencepiece_model_with_other_settings_is_refused(tmp_path):
    """A dummy prefix would change every encoding; the converter must not silently drop it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(INTERNLM2_TINY / name, tmp_path / name)
    proto = import_protobuf().ModelProto()
    proto.ParseFromString((INTERNLM2_TINY / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"add_dummy_prefix=True \(need False\)"):
        convert_tokenizer(tmp_path, 1659)


def test_check_special_token_ids_lists_every_disagreeing_token():
    tokenizer = convert_tokenizer(INTERNLM2_MODEL, 1009)
    check_special_token_ids(tokenizer, {"<IMG_CONTEXT>": 1002, "<img>": 1000, "</img>": 1001, IMGBOS_TOKEN: 1009})
    with pytest.raises(ValueError) as error:
        check_special_token_ids(tokenizer, {"<IMG_CONTEXT>": 1003, "<img>": 1000, IMGPAD_TOKEN: 1010})
    message = str(error.value)
    assert "'<IMG_CONTEXT>': expected id 1003, tokenizer gives [1002]" in message
    assert "'<imgpad>': expected id 1010, tokenizer gives [1011]" in message
    assert message.count("expected id") == 2  # <img> agrees, so it is not listed
