"""Turn a released InternVL2.5 tokenizer folder into transformers-5-native tokenizer files with ARMOR's three specials.

InternVL2.5 ships two kinds of tokenizer:

* Qwen2 (InternVL2_5-1B/4B/38B/78B): transformers' own `Qwen2Tokenizer` reproduces it; we load it as is.
* InternLM2 (InternVL2_5-2B/8B/26B): a remote-code sentencepiece tokenizer (`InternLM2Tokenizer`, loaded by InternVL
  with `use_fast=False`). We rebuild it as a `tokenizers` BPE model (byte fallback, no prefix space) inside a
  `tokenizer.json` that the built-in `TokenizersBackend` loads, so no `.py` file or `auto_map` is needed. Its decoder
  reproduces the reference decode quirks, described at `internlm2_decoder`.

Then `<imgbos>`, `<imgend>`, `<imgpad>` are appended as special tokens at ids V, V+1, V+2 (V = the LLM's vocab size).
The caller saves the result with `tokenizer.save_pretrained(checkpoint / "tokenizer")`.
"""

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer, TokenizersBackend
from transformers.convert_slow_tokenizer import import_protobuf
from transformers.tokenization_utils_base import generate_merges

IMGBOS_TOKEN = "<imgbos>"
IMGEND_TOKEN = "<imgend>"
IMGPAD_TOKEN = "<imgpad>"
ARMOR_SPECIAL_TOKENS = (IMGBOS_TOKEN, IMGEND_TOKEN, IMGPAD_TOKEN)

INTERNLM2_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
INTERNLM2_NAMED_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
QWEN2_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt")

# sentencepiece piece types (sentencepiece_model.proto)
SP_NORMAL, SP_USER_DEFINED, SP_UNUSED = 1, 4, 5
SP_BPE = 2

# The reference's `clean_up_tokenization`, applied in this order by `InternLM2Tokenizer.convert_tokens_to_string`
# although the config says `clean_up_tokenization_spaces: false`.
CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

# Unicode noncharacters (reserved for internal use, never in real text) that mark special tokens inside the decoder.
# S: special tokens inside the sentencepiece vocabulary (<unk>, <s>, </s>, the chat tokens);
# L: special tokens appended after it (<img>, <IMG_CONTEXT>, ..., ARMOR's three).
S_OPEN, S_CLOSE, L_OPEN, L_CLOSE = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"


def convert_tokenizer(source_dir: str | Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """Load the InternLM2 or Qwen2 tokenizer in `source_dir` natively and append ARMOR's specials at ids V..V+2."""
    source_dir = Path(source_dir)
    family = detect_tokenizer_family(source_dir)
    tokenizer = load_internlm2_tokenizer(source_dir) if family == "internlm2" else load_qwen2_tokenizer(source_dir)
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"The tokenizer in {source_dir} has {len(tokenizer)} tokens but the model's llm_config.vocab_size is "
            f"{vocab_size}; they must be equal so that <imgbos>/<imgend>/<imgpad> land at ids V, V+1, V+2. Pass the "
            "tokenizer folder that belongs to this checkpoint."
        )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(ARMOR_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    if family == "internlm2":
        # The decoder spaces the appended specials like InternVL's own tokens, so it must know the new ones.
        tokenizer.backend_tokenizer.decoder = internlm2_decoder(tokenizer)
    check_special_token_ids(tokenizer, {token: vocab_size + i for i, token in enumerate(ARMOR_SPECIAL_TOKENS)})
    return tokenizer


def check_special_token_ids(tokenizer: PreTrainedTokenizerBase, expected: dict[str, int]) -> None:
    """Raise if any token is not a single token with the expected id (e.g. the config's image token ids)."""
    problems = []
    for token, expected_id in expected.items():
        ids = tokenizer.encode(token, add_special_tokens=False)
        if ids != [expected_id]:
            problems.append(f"{token!r}: expected id {expected_id}, tokenizer gives {ids}")
    if problems:
        raise ValueError(
            "Tokenizer and config disagree on special token ids:\n  " + "\n  ".join(problems) + "\nUse the tokenizer "
            "that was trained with this checkpoint, or fix the ids in the config."
        )


def detect_tokenizer_family(source_dir: Path) -> str:
    """Return "internlm2" or "qwen2" from the files and `tokenizer_class` of a released tokenizer folder."""
    present = [name for name in TOKENIZER_FILES if (source_dir / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"No tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source_dir}. Point the converter at the folder "
            "holding the InternVL2.5 tokenizer with `--tokenizer PATH`."
        )
    tokenizer_class = read_tokenizer_config(source_dir).get("tokenizer_class")
    if tokenizer_class in INTERNLM2_TOKENIZER_CLASSES and "tokenizer.model" in present:
        return "internlm2"
    if tokenizer_class in QWEN2_TOKENIZER_CLASSES and (
        "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= set(present)
    ):
        return "qwen2"
    raise ValueError(
        f"Unsupported tokenizer in {source_dir}: tokenizer_class {tokenizer_class!r} with files {present}. Supported: "
        f"{INTERNLM2_TOKENIZER_CLASSES[0]} (tokenizer.model) and {QWEN2_TOKENIZER_CLASSES[0]} (tokenizer.json or "
        "vocab.json + merges.txt), as in the InternVL2.5 releases."
    )


def read_tokenizer_config(source_dir: Path) -> dict:
    config_file = source_dir / "tokenizer_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing: it names the tokenizer class and its added tokens. Pass the complete "
            "tokenizer folder of the release with `--tokenizer PATH`."
        )
    return json.loads(config_file.read_text(encoding="utf-8"))


def load_qwen2_tokenizer(source_dir: Path) -> Qwen2Tokenizer:
    """transformers' `Qwen2Tokenizer` encodes and decodes exactly like the 4.37 slow class InternVL uses."""
    tokenizer = Qwen2Tokenizer.from_pretrained(source_dir)
    # Keep the saved config free of remote code and of where this copy happened to be loaded from.
    for key in ("auto_map", "is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def load_internlm2_tokenizer(source_dir: Path) -> TokenizersBackend:
    """Rebuild InternVL's `InternLM2Tokenizer` (sentencepiece BPE + added tokens) as a `tokenizers` BPE tokenizer.

    Encoding matches because the reference splits the text at its special tokens and runs sentencepiece BPE on each
    piece, and sentencepiece BPE with identity normalisation is: spaces -> "▁", greedy merges by piece score,
    user-defined pieces kept whole, unknown characters as byte pieces. Each of those has a `tokenizers` equivalent.
    """
    config = read_tokenizer_config(source_dir)
    proto = import_protobuf().ModelProto()
    proto.ParseFromString((source_dir / "tokenizer.model").read_bytes())
    check_sentencepiece_settings(proto, source_dir)
    if config.get("clean_up_tokenization_spaces", False):
        raise ValueError(
            f"{source_dir}/tokenizer_config.json sets clean_up_tokenization_spaces=true; InternVL2.5 releases set "
            "false, and only that decode behaviour is reproduced."
        )

    pieces = list(proto.pieces)
    added = {int(index): token for index, token in config.get("added_tokens_decoder", {}).items()}
    # The reference's `all_special_tokens`: the named ones (class defaults if absent) and additional_special_tokens.
    named = {key: token_content(config.get(key, default)) for key, default in INTERNLM2_NAMED_TOKENS.items()}
    extra = [token_content(token) for token in config.get("additional_special_tokens", [])]
    reference_specials = {token for token in named.values() if token} | set(extra)
    for index, token in sorted(added.items()):
        if not token.get("special") or token["content"] not in reference_specials:
            raise ValueError(
                f"Added token {token['content']!r} (id {index}) in {source_dir}/tokenizer_config.json is not a "
                "special token listed in bos/eos/unk/pad_token or additional_special_tokens; InternVL2.5 releases "
                "have none such, and the reference decode of such tokens is not reproduced."
            )
    appended = sorted(index for index in added if index >= len(pieces))
    if appended != list(range(len(pieces), len(pieces) + len(appended))):
        raise ValueError(
            f"Added tokens past the sentencepiece vocabulary ({len(pieces)} pieces) must have consecutive ids from "
            f"{len(pieces)}; {source_dir}/tokenizer_config.json has {appended}."
        )

    # Vocabulary = the sentencepiece pieces by id; an added token with an id inside it (InternLM2's chat tokens lie
    # over [UNUSED_TOKEN_141..146]) renames that piece, as the reference's added-token table overrides it.
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    for index in (index for index in added if index < len(pieces)):
        content = added[index]["content"]
        if content != pieces[index].piece:
            if content in vocab:
                raise ValueError(f"Added token {content!r} (id {index}) is also sentencepiece piece {vocab[content]}.")
            vocab[content] = vocab.pop(pieces[index].piece)
    # sentencepiece merges two adjacent normal pieces when their concatenation is a piece, highest score first.
    scores = {piece.piece: piece.score for piece in pieces}
    not_mergeable = {piece.piece for piece in pieces if piece.type != SP_NORMAL}
    merges = generate_merges(vocab, scores, skip_tokens=not_mergeable | {token["content"] for token in added.values()})

    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    # User-defined pieces are matched whole anywhere in the (normalised) text, never merged.
    backend.add_tokens(
        [
            AddedToken(piece.piece, special=False, normalized=True)
            for index, piece in enumerate(pieces)
            if piece.type == SP_USER_DEFINED and index not in added
        ]
    )
    backend.add_special_tokens(
        [AddedToken(added[index]["content"], special=True, normalized=False) for index in sorted(added)]
    )
    for index, token in added.items():
        if backend.token_to_id(token["content"]) != index:
            raise ValueError(
                f"Added token {token['content']!r} should have id {index} but gets "
                f"{backend.token_to_id(token['content'])} in the rebuilt tokenizer; check "
                f"{source_dir}/tokenizer_config.json for duplicate contents."
            )

    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        **named,
        extra_special_tokens=extra,
        add_bos_token=config.get("add_bos_token", True),
        add_eos_token=config.get("add_eos_token", False),
        clean_up_tokenization_spaces=False,  # the clean-up is part of the decoder, see `internlm2_decoder`
        model_max_length=config.get("model_max_length", int(1e30)),
        chat_template=config.get("chat_template"),
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.backend_tokenizer.post_processor = internlm2_post_processor(tokenizer)
    tokenizer.backend_tokenizer.decoder = internlm2_decoder(tokenizer)
    return tokenizer


def token_content(token: str | dict | None) -> str | None:
    """Config files store a token either as its string or as a serialised AddedToken."""
    return token["content"] if isinstance(token, dict) else token


def check_sentencepiece_settings(proto, source_dir: Path) -> None:
    """Only InternLM2's sentencepiece settings are reproduced; refuse a model that would encode differently."""
    normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
    settings = {
        "model_type": (trainer.model_type, SP_BPE),
        "byte_fallback": (trainer.byte_fallback, True),
        "treat_whitespace_as_suffix": (trainer.treat_whitespace_as_suffix, False),
        "add_dummy_prefix": (normalizer.add_dummy_prefix, False),
        "remove_extra_whitespaces": (normalizer.remove_extra_whitespaces, False),
        "escape_whitespaces": (normalizer.escape_whitespaces, True),
        "precompiled_charsmap (non-identity normalisation)": (bool(normalizer.precompiled_charsmap), False),
        "UNUSED pieces": (sum(piece.type == SP_UNUSED for piece in proto.pieces), 0),
    }
    wrong = [f"{name}={value!r} (need {need!r})" for name, (value, need) in settings.items() if value != need]
    if wrong:
        raise ValueError(
            f"{source_dir}/tokenizer.model is not an InternLM2-style sentencepiece model: {', '.join(wrong)}. "
            "Only BPE with byte fallback, identity normalisation, no dummy prefix and whitespace kept is supported."
        )


def internlm2_post_processor(tokenizer: TokenizersBackend) -> processors.TemplateProcessing:
    """The reference's `build_inputs_with_special_tokens`: [bos] + A (+ B) (+ [eos]), no bos before B."""
    bos = [(tokenizer.bos_token, tokenizer.bos_token_id)] if tokenizer.add_bos_token else []
    eos = [(tokenizer.eos_token, tokenizer.eos_token_id)] if tokenizer.add_eos_token else []
    prefix = "".join(f"{token} " for token, _ in bos)
    suffix = "".join(f" {token}" for token, _ in eos)
    return processors.TemplateProcessing(
        single=f"{prefix}$A{suffix}", pair=f"{prefix}$A $B:1{suffix}", special_tokens=bos + eos
    )


def internlm2_decoder(tokenizer: TokenizersBackend) -> decoders.Sequence:
    """A `tokenizers` decoder that reproduces `InternLM2Tokenizer.decode` (transformers 4.37) exactly.

    The reference cuts the tokens into chunks at the specials appended past the sentencepiece vocabulary (L: <img>,
    <IMG_CONTEXT>, ..., and ARMOR's), decodes each chunk and joins chunks and L tokens with single spaces. Inside a
    chunk, each special of the sentencepiece range (S: <s>, </s>, <unk>, <|im_end|>, ...) is written as
    `" " + sentencepiece_decode(run of ordinary tokens before it) + special`, except that the space is left out when
    the run is empty and follows another S; then the chunk gets the punctuation clean-up (" ." -> "." ...).
    With `skip_special_tokens=True` all specials are dropped first, so only the clean-up remains.

    The decoder marks S and L tokens with noncharacters, turns pieces into text (▁ -> space, byte pieces -> UTF-8),
    joins everything, then applies those rules with regular expressions and removes the marks.
    """
    n_pieces = tokenizer.vocab_size
    specials = {index: token.content for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    steps = []
    for index, content in sorted(specials.items()):
        opening, closing = (S_OPEN, S_CLOSE) if index < n_pieces else (L_OPEN, L_CLOSE)
        steps.append(decoders.Replace(Regex(rf"\A{regex_escape(content)}\z"), f"{opening}{content}{closing}"))
    steps += [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]

    run = f"[^{S_OPEN}{S_CLOSE}{L_OPEN}{L_CLOSE}]"  # text of ordinary tokens between two marks
    # " " before the run that ends at an S: after an L, at the start, or after an S when the run is not empty.
    steps.append(
        decoders.Replace(Regex(rf"(?:\A|(?<={L_CLOSE}))(?={run}*{S_OPEN})|(?<={S_CLOSE})(?={run}+{S_OPEN})"), " ")
    )
    steps += [decoders.Replace(S_OPEN, ""), decoders.Replace(S_CLOSE, "")]
    # The clean-up cannot reach across an L mark, so it stays inside each chunk as in the reference.
    steps += [decoders.Replace(old, new) for old, new in CLEANUP_REPLACEMENTS]
    # One space between neighbouring chunks / L tokens.
    steps += [
        decoders.Replace(f"{L_CLOSE}{L_OPEN}", " "),
        decoders.Replace(Regex(rf"{L_CLOSE}(?=[\s\S])"), " "),
        decoders.Replace(L_CLOSE, ""),
        decoders.Replace(Regex(rf"(?<=[\s\S]){L_OPEN}"), " "),
        decoders.Replace(L_OPEN, ""),
    ]
    return decoders.Sequence(steps)


def regex_escape(text: str) -> str:
    """Escape Oniguruma metacharacters (Python's `re.escape` also escapes `<`/`>`, which Oniguruma may not accept)."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", text)
