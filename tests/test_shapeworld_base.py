"""Shape world, step 2: `scripts/shapeworld_base.py`, the base InternVL2.5 trained on ti2t + t2t, on CPU (--smoke)."""

import json
import sys

import pytest
import torch
from conftest import FIXTURES, REPO_ROOT
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, InternVLForConditionalGeneration

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import shapeworld_base  # noqa: E402

from armor import convert_checkpoint  # noqa: E402
from shapeworld.data import read_records  # noqa: E402

SMOKE_STEPS = shapeworld_base.SMOKE_DEFAULTS["steps"]
STOP_AT = 6


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run, stopped at step 6 by --stop-at and finished by a second, identical command without it."""
    output_dir = tmp_path_factory.mktemp("shapeworld-base") / "run"
    command = ["--smoke", "--output-dir", str(output_dir)]
    first = shapeworld_base.main(command + ["--stop-at", str(STOP_AT)])
    second = shapeworld_base.main(command)
    return {"first": first, "second": second, "output_dir": output_dir, "command": command}


@pytest.fixture(scope="module")
def processor(smoke):
    release = smoke["output_dir"] / shapeworld_base.RELEASE_DIR
    config = json.loads((release / "config.json").read_text())
    return shapeworld_base.build_processor(release, config["image_seq_length"])


def test_release_folder_loads_as_transformers_internvl(smoke):
    release = smoke["output_dir"] / shapeworld_base.RELEASE_DIR
    names = {path.name for path in release.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    }
    model = InternVLForConditionalGeneration.from_pretrained(release)
    tokenizer = AutoTokenizer.from_pretrained(release)
    config = model.config
    assert config.model_type == "internvl" and not config.text_config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.image_seq_length == (448 // shapeworld_base.SMOKE_DEFAULTS["patch_size"] // 2) ** 2 == 16
    # transformers' InternVL processor reads the image tokens from these names; ARMOR's tokens are not there yet.
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    assert tokenizer.context_image_token == "<IMG_CONTEXT>" and tokenizer.video_token == "<video>"
    assert tokenizer.convert_tokens_to_ids("<video>") == len(tokenizer) - 1
    assert not {"<imgbos>", "<imgend>", "<imgpad>"} & set(tokenizer.get_vocab())
    assert json.loads((release / "processor_config.json").read_text()) == {
        "image_seq_length": 16,
        "processor_class": "InternVLProcessor",
    }
    generation = json.loads((release / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the chat template puts transformers' image token where InternVL's chat() puts <image>
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = shapeworld_base.build_internvl_prompt("Describe the image.", num_images=1)
    assert prompt == expected.replace("<image>", "<IMG_CONTEXT>")


def test_loss_falls_over_the_smoke_steps(smoke):
    losses = smoke["second"]["losses"]
    assert len(losses) == SMOKE_STEPS
    vocab_size = smoke["second"]["vocab_size"]
    assert abs(losses[0] - torch.log(torch.tensor(float(vocab_size))).item()) < 0.3  # starts at chance
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0


def test_resumed_run_continues_the_step_count(smoke):
    first, second = smoke["first"], smoke["second"]
    assert (first["step"], first["finished"], first["stopped_by"]) == (STOP_AT, False, "stop_at")
    assert (second["step"], second["finished"], second["stopped_by"]) == (SMOKE_STEPS, True, "steps")
    assert [(run["first_step"], run["last_step"]) for run in second["runs"]] == [(0, STOP_AT), (STOP_AT, SMOKE_STEPS)]
    assert second["losses"][:STOP_AT] == first["losses"]  # the history is carried on, not restarted
    assert second["samples_seen"] == SMOKE_STEPS * shapeworld_base.SMOKE_DEFAULTS["batch_size"]
    logged = [json.loads(line)["step"] for line in (smoke["output_dir"] / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, SMOKE_STEPS + 1))  # --log-every 1: every step once
    again = shapeworld_base.main(smoke["command"])  # a finished run is skipped
    assert again["skipped"] and again["step"] == SMOKE_STEPS


def test_resuming_with_other_settings_is_refused(smoke):
    with pytest.raises(SystemExit, match="--learning-rate 0.003 \\(now 0.001\\)"):
        shapeworld_base.main(smoke["command"] + ["--learning-rate", "1e-3"])


def test_batches_of_a_resumed_run_are_those_of_an_uninterrupted_one():
    whole = list(shapeworld_base.StepBatches(10, 4, 0, 7, seed=3))
    resumed = list(shapeworld_base.StepBatches(10, 4, 3, 7, seed=3))
    assert resumed == whole[3:]
    stream = [index for batch in whole for index in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # permutations
    assert stream[:10] != stream[10:20]


def test_labels_cover_the_answer_and_end_of_turn_only(smoke, processor):
    data_dir = smoke["output_dir"] / "data"
    dataset = shapeworld_base.training_dataset([data_dir / "train" / "shard-00"], processor, seed=0)
    records = read_records(data_dir / "train" / "shard-00")
    tokenizer = processor.tokenizer
    vocab_size = processor.imgbos_token_id
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    checked = set()
    for index, record in enumerate(records):
        item = dataset[index]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        answer_ids = tokenizer(record["meta"]["answer"], add_special_tokens=False)["input_ids"]
        trained = [position for position, label in enumerate(labels) if label != -100]
        # exactly the answer's tokens and the <|im_end|> after them, at the end of the sequence but for the newline
        assert [ids[position] for position in trained] == answer_ids + [end_of_turn]
        assert [labels[position] for position in trained] == answer_ids + [end_of_turn]
        assert trained == list(range(len(ids) - len(answer_ids) - 2, len(ids) - 1))
        assert tokenizer.decode(ids[: trained[0]]).endswith("<|im_start|>assistant\n")
        assert max(labels) < vocab_size
        kind = record["meta"]["kind"]
        context = ids.count(processor.image_token_id)
        assert context == (processor.image_seq_length if kind == "ti2t" else 0)
        assert (item["pixel_values"] is None) == (kind == "t2t")
        if kind == "ti2t":
            assert tuple(item["pixel_values"].shape) == (1, 3, 448, 448)  # a 256px world image is one tile
        checked.add(kind)
    assert checked == {"ti2t", "t2t"}


def test_understanding_accuracy_counts_exact_matches_per_question_type(smoke):
    folder = smoke["output_dir"] / "data" / "test"
    records = read_records(folder)
    expected = iter([question["answer"] for question in shapeworld_base.understanding_questions(records, folder)])
    seen_images = []

    def answers(batch: list[str], images: list) -> list[str]:
        seen_images.extend(images)
        # right answers (with white space around them) for ti2t, wrong ones for t2t; questions come in record order
        return [f" {next(expected)}\n" if image is not None else next(expected) + "!" for image in images]

    result = shapeworld_base.understanding_accuracy(records, folder, answers, batch_size=5)
    ti2t = sum(record["meta"]["kind"] == "ti2t" for record in records)
    t2t = sum(record["meta"]["kind"] == "t2t" for record in records)
    assert result["ti2t"]["all"] == {"n": ti2t, "correct": ti2t, "accuracy": 1.0}
    assert result["t2t"]["all"] == {"n": t2t, "correct": 0, "accuracy": 0.0}
    assert result["all"]["n"] == ti2t + t2t and result["all"]["correct"] == ti2t
    assert sum(entry["n"] for task, entry in result["ti2t"].items() if task != "all") == ti2t
    assert len(seen_images) == ti2t + t2t
    assert all(isinstance(image, Image.Image) and image.size == (256, 256) for image in seen_images if image)
    assert {example["id"] for example in result["wrong_examples"]} <= {r["id"] for r in records if "t2t" in r["id"]}


def test_smoke_summary_holds_accuracy_on_both_evaluation_splits(smoke):
    accuracy = smoke["second"]["accuracy"]
    defaults = shapeworld_base.SMOKE_DEFAULTS
    assert accuracy["test"]["all"]["n"] == defaults["test_ti2t"] + defaults["test_t2t"]
    assert accuracy["heldout"]["all"]["n"] == defaults["heldout_ti2t"] + defaults["heldout_t2t"]
    table = shapeworld_base.format_table(accuracy)
    assert table.splitlines()[0] == "| kind | question | test accuracy (n) | heldout accuracy (n) |"


def test_convert_checkpoint_accepts_the_release(smoke, tmp_path):
    release = smoke["output_dir"] / shapeworld_base.RELEASE_DIR
    output = tmp_path / "armor"
    arguments = ["--internvl", str(release), "--vqgan", str(FIXTURES / "chameleon-vqgan-tiny")]
    assert convert_checkpoint.main(arguments + ["--image-size", "256", "--output", str(output)]) == 0
    config = json.loads((output / "config.json").read_text())
    base = json.loads((release / "config.json").read_text())
    vocab_size = base["text_config"]["vocab_size"]
    assert config["model_type"] == "armor"
    assert config["text_config"]["vocab_size"] == vocab_size and config["imgbos_token_id"] == vocab_size
    assert config["num_image_codes"] == 256 and config["image_seq_length"] == base["image_seq_length"]
    armor_tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
    assert armor_tokenizer.convert_tokens_to_ids(["<imgbos>", "<imgend>", "<imgpad>"]) == [
        vocab_size,
        vocab_size + 1,
        vocab_size + 2,
    ]
    head = InternVLForConditionalGeneration.from_pretrained(release).lm_head.weight  # keys as transformers saves them
    index = output / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"]["lm_head.weight"] if index.is_file() else "model.safetensors"
    with safe_open(output / shard, "pt") as converted:
        assert torch.equal(converted.get_tensor("lm_head.weight"), head)
