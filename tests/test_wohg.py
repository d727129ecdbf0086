"""WoHG training (issue #4): data records -> ids and labels, the offline image-code cache, the three stages.

A tiny ARMOR checkpoint is converted from the fixtures (InternVL2.5 tiny Qwen2 + tiny Chameleon VQGAN at 64 px, i.e.
16 codes per image) and a tiny dataset with real PNG files is written here, one record of each kind.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, REPO_ROOT
from PIL import Image
from safetensors.torch import load_file
from tiny_models import VOCAB_SIZE as TINY_V
from tiny_models import tiny_model
from transformers import AutoModel, AutoProcessor, TrainerCallback

from armor import convert_checkpoint as cc
from armor import train_wohg, wohg_data
from armor.modeling_armor import ArmorForConditionalGeneration
from armor.modeling_vqgan import ArmorVQGANModel
from armor.processing_armor import ArmorProcessor, build_internvl_prompt

V = 1012  # the tiny Qwen2 vocabulary: <imgbos> 1012, <imgend> 1013, <imgpad> 1014, codes from 1015
IMGBOS, IMGEND, IMGPAD, CODE0 = V, V + 1, V + 2, V + 3
IMG_CONTEXT, IMG_START, IMG_END = 1005, 1003, 1004
IM_END = 1002  # <|im_end|>
NUM_CODES = 16
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 220), "yellow": (240, 220, 20)}

RECORDS_A = [
    {
        "id": "t2t",
        "conversations": [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}],
    },
    {
        "id": "ti2t",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this photo about?"},
            {"from": "gpt", "value": "A red square."},
        ],
        "image": ["images/red.png"],
    },
    {
        "id": "t2i",
        "conversations": [{"from": "human", "value": "Draw a green square."}, {"from": "gpt", "value": "<image>"}],
        "image": "images/green.png",
    },
    {
        "id": "t2ti",
        "conversations": [
            {"from": "human", "value": "Show me blue."},
            {"from": "gpt", "value": "Here is blue: <image> It is calm."},
        ],
        "image": ["images/blue.png"],
    },
]
RECORDS_B = [
    {
        "id": "ti2ti",
        "conversations": [
            {"from": "human", "value": "<image>\nMake it green."},
            {"from": "gpt", "value": "Done. <image>"},
        ],
        "image": ["images/red.png", "images/green.png"],
    },
    {
        "id": "intersyn",
        "conversations": [
            {"from": "human", "value": "Tell a story about the sun."},
            {"from": "gpt", "value": "Once upon a time.", "caption": "a yellow sun", "image": "images/yellow.png"},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "The sky turned blue.", "caption": "a blue sky", "image": "images/blue.png"},
        ],
    },
    {
        "id": "flat",
        "human1": "Tell a story about the sun.",
        "gpt1": "Once upon a time.",
        "caption1": "a yellow sun",
        "image1": "images/yellow.png",
        "human2": "And then?",
        "gpt2": "The sky turned blue.",
        "caption2": "a blue sky",
        "image2": "images/blue.png",
    },
    {
        "id": "system",
        "conversations": [
            {"from": "system", "value": "You draw."},
            {"from": "user", "value": "A yellow square?"},
            {"from": "assistant", "value": "<image>"},
        ],
        "image": ["images/yellow.png"],
    },
]


def square(color: tuple[int, int, int], seed: int, size: int = 32) -> Image.Image:
    """A colored square with a little noise (so the VQGAN codes are not all alike)."""
    noise = np.random.default_rng(seed).integers(-25, 25, (size, size, 3))
    return Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8))


def write_jsonl(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def write_images(folder: Path):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for seed, (name, color) in enumerate(COLORS.items()):
        square(color, seed).save(folder / "images" / f"{name}.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("ckpt") / "armor-tiny"
    return cc.convert(
        str(FIXTURES / "internvl2_5-tiny-qwen2"),
        vqgan=str(FIXTURES / "chameleon-vqgan-tiny"),
        output=output,
        adapter_layers=2,
        image_size=64,
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def processor(checkpoint) -> ArmorProcessor:
    return ArmorProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def data(tmp_path_factory, checkpoint) -> Path:
    """A folder of two JSONL files (every kind, multi-turn, both layouts), tokenized once."""
    folder = tmp_path_factory.mktemp("data")
    write_images(folder)
    write_jsonl(folder / "part-a.jsonl", RECORDS_A)
    write_jsonl(folder / "part-b.jsonl", RECORDS_B)
    assert wohg_data.main(["tokenize", "--data", str(folder), "--model", str(checkpoint), "--num-workers", "0"]) == 0
    return folder


def make_dataset(data, processor, checkpoint, **options) -> wohg_data.WoHGDataset:
    return wohg_data.WoHGDataset([data], processor, str(checkpoint), 64, NUM_CODES, **options)


@pytest.fixture(scope="module")
def dataset(data, processor, checkpoint) -> wohg_data.WoHGDataset:
    return make_dataset(data, processor, checkpoint)


def sample_of(dataset, record_id: str) -> wohg_data.Sample:
    index = next(i for i, c in enumerate(dataset.conversations) if f"(id={record_id})" in c.location)
    return dataset.sample(index)


# ---------------------------------------------------------------------------------------------- the code cache


def test_tokenize_caches_the_codes_the_processor_would_make(data, checkpoint, processor):
    cache_dir = data / wohg_data.CACHE_FOLDER
    (index_file,) = cache_dir.glob("vqgan-*-64px.json")
    index = json.loads(index_file.read_text())
    assert sorted(index["entries"]) == [f"images/{name}.png" for name in ("blue", "green", "yellow")]  # targets only
    codes = load_file(str(index_file.with_suffix(".safetensors")))["codes"]
    assert codes.shape == (3, NUM_CODES) and codes.dtype == torch.int16
    drawing = ArmorProcessor.from_pretrained(checkpoint)
    drawing.vqgan = ArmorVQGANModel.from_pretrained(checkpoint / "vqgan")
    for key, entry in index["entries"].items():
        expected = drawing.encode_image_target(data / key)
        assert [IMGBOS, *(codes[entry["row"]].long() + CODE0).tolist(), IMGEND] == expected
    assert len(set(map(tuple, codes.tolist()))) == 3  # three different images, three different code grids


def test_tokenize_again_encodes_only_new_or_changed_images(data, checkpoint, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    summary = wohg_data.tokenize_images([copy], str(checkpoint), num_workers=0, progress=False, log=lambda _: None)
    assert (summary["encoded"], summary["kept"]) == (0, 3)
    square((0, 0, 0), 9).save(copy / "images" / "blue.png")
    summary = wohg_data.tokenize_images([copy], str(checkpoint), num_workers=0, progress=False, log=lambda _: None)
    assert (summary["encoded"], summary["kept"]) == (1, 2)


def test_missing_or_stale_cache_stops_with_the_command_to_run(data, checkpoint, processor, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(wohg_data.CACHE_FOLDER))
    with pytest.raises(
        wohg_data.CacheError,
        match=r"(?s)does not exist.*3 target image\(s\) have no codes.*wohg_data.py tokenize --data",
    ):
        make_dataset(copy, processor, checkpoint)
    shutil.copytree(data / wohg_data.CACHE_FOLDER, copy / wohg_data.CACHE_FOLDER)
    make_dataset(copy, processor, checkpoint)  # up to date again
    square((0, 0, 0), 9).save(copy / "images" / "green.png")
    with pytest.raises(wohg_data.CacheError, match=r"1 target image\(s\) changed since their codes were made"):
        make_dataset(copy, processor, checkpoint)
    with pytest.raises(wohg_data.CacheError, match=r"other VQGANs or image sizes: \['vqgan-[0-9a-f]{16}-64px'\]"):
        wohg_data.WoHGDataset([copy], processor, str(checkpoint), 128, NUM_CODES)


def test_interrupted_tokenize_cannot_leave_an_index_pointing_at_renumbered_rows(data, checkpoint, processor, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    # Without green.png the kept rows are renumbered (blue 0, yellow 2 -> 1): the old index would point past them.
    write_jsonl(copy / "part-a.jsonl", [r for r in RECORDS_A if r["id"] != "t2i"])
    write_jsonl(copy / "part-b.jsonl", [r for r in RECORDS_B if r["id"] != "ti2ti"])
    real_replace = wohg_data.os.replace

    def crash_before_the_index(source, target):
        if str(target).endswith(".json"):
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wohg_data.os, "replace", crash_before_the_index)
        with pytest.raises(KeyboardInterrupt):
            wohg_data.tokenize_images([copy], str(checkpoint), num_workers=0, progress=False, log=lambda _: None)
    with pytest.raises(
        wohg_data.InconsistentCacheError,
        match=r"(?s)Stale/inconsistent image-code cache: .*not written with its index.*Re-run `python wohg_data.py "
        r"tokenize \.\.\.`.*\n    python wohg_data.py tokenize --data",
    ):
        make_dataset(copy, processor, checkpoint)
    logs = []
    summary = wohg_data.tokenize_images([copy], str(checkpoint), num_workers=0, progress=False, log=logs.append)
    assert (summary["encoded"], summary["kept"]) == (2, 0) and logs[0].startswith("rebuilding the cache: ")
    dataset = make_dataset(copy, processor, checkpoint)
    drawing = ArmorProcessor.from_pretrained(checkpoint)
    drawing.vqgan = ArmorVQGANModel.from_pretrained(checkpoint / "vqgan")
    for name in ("blue", "yellow"):
        codes = dataset.caches[0].codes(copy / "images" / f"{name}.png")
        assert [IMGBOS, *(CODE0 + c for c in codes), IMGEND] == drawing.encode_image_target(
            copy / "images" / f"{name}.png"
        )


def test_a_cache_of_an_unknown_format_stops_with_the_command_and_tokenize_rebuilds_it(
    data, checkpoint, processor, tmp_path
):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (index_file,) = (copy / wohg_data.CACHE_FOLDER).glob("vqgan-*-64px.json")
    index = json.loads(index_file.read_text())
    assert index["format"] == wohg_data.CACHE_FORMAT
    index_file.write_text(json.dumps({**index, "format": 99}))
    with pytest.raises(
        wohg_data.InconsistentCacheError,
        match=r"(?s)Stale/inconsistent image-code cache: .*cache format 99; this code reads format \d.*Re-run "
        r"`python wohg_data.py tokenize \.\.\.`",
    ):
        make_dataset(copy, processor, checkpoint)
    summary = wohg_data.tokenize_images([copy], str(checkpoint), num_workers=0, progress=False, log=lambda _: None)
    assert (summary["encoded"], summary["kept"]) == (3, 0)
    make_dataset(copy, processor, checkpoint)


def test_the_vqgan_folder_and_end_of_turn_come_from_the_processor_module(checkpoint, tmp_path, monkeypatch):
    from armor import processing_armor

    assert wohg_data.END_OF_TURN_TOKEN + "\n" == processing_armor.END_OF_TURN
    assert wohg_data.vqgan_folder_of(checkpoint) == checkpoint / processing_armor.VQGAN_SUBFOLDER
    (tmp_path / "vq").mkdir()
    monkeypatch.setattr(wohg_data, "VQGAN_SUBFOLDER", "vq")
    assert wohg_data.vqgan_folder_of(tmp_path) == tmp_path / "vq"


# ---------------------------------------------------------------------------------------------- ids and labels


def test_every_kind_is_read_from_both_layouts_and_folders(dataset):
    assert len(dataset) == 8 and not dataset.skipped
    assert dataset.kinds() == {"t2t": 1, "ti2t": 1, "t2i": 2, "t2ti": 3, "ti2ti": 1}


def test_prompt_ids_and_tiles_equal_the_processors_at_inference(dataset, processor, data):
    sample = sample_of(dataset, "ti2t")
    prompt = build_internvl_prompt("<image>\nWhat is this photo about?")
    expected = processor(text=prompt, images=[data / "images" / "red.png"])
    length = expected["input_ids"].shape[1]
    assert sample.input_ids[:length] == expected["input_ids"][0].tolist()
    assert torch.equal(sample.pixel_values, expected["pixel_values"])
    answer = processor.tokenizer("A red square.", add_special_tokens=False)["input_ids"]
    assert sample.input_ids[length:] == [*answer, IM_END, 198]  # 198: "\n"
    assert sample.labels == [-100] * length + [*answer, IM_END, -100]


def test_internlm2_prompts_of_every_turn_equal_the_processors(tmp_path, data):
    """InternVL2.5-8B's tokenizer (sentencepiece, leading <s>): turn 2's prompt includes turn 1 as history."""
    checkpoint = cc.convert(
        str(FIXTURES / "internvl2_5-tiny-internlm2"),
        vqgan=str(FIXTURES / "chameleon-vqgan-tiny"),
        output=tmp_path / "armor-internlm2",
        adapter_layers=1,
        image_size=64,
        log=lambda _: None,
    )
    processor = ArmorProcessor.from_pretrained(checkpoint)
    turns = [("<image>\nWhat is this photo about?", "A red square."), ("Really?", "Yes.")]
    record = {"conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]}
    write_jsonl(tmp_path / "chat.jsonl", [{**record, "image": str(data / "images" / "red.png")}])
    sample = wohg_data.WoHGDataset([tmp_path / "chat.jsonl"], processor, str(checkpoint), 64, NUM_CODES).sample(0)
    image = [data / "images" / "red.png"]
    first = processor(text=build_internvl_prompt(turns[0][0]), images=image)["input_ids"][0].tolist()
    second = processor(text=build_internvl_prompt(turns[1][0], history=turns[:1]), images=image)["input_ids"][0]
    assert first[0] == 1 and sample.input_ids[: len(first)] == first
    assert sample.input_ids[: len(second)] == second.tolist()
    assert [start for start, _ in sample.answers] == [len(first), len(second)]


def test_labels_keep_only_answer_text_image_tokens_and_end_of_turn(dataset, processor):
    sample = sample_of(dataset, "ti2ti")
    ids, labels = torch.tensor(sample.input_ids), torch.tensor(sample.labels)
    (answer_start, answer_end), ((imgbos, imgend, _),) = sample.answers[0], sample.targets
    assert (ids == IMG_CONTEXT).sum() == 256 and (labels[ids == IMG_CONTEXT] == -100).all()
    assert (labels[:answer_start] == -100).all()  # system, question, <img> ... </img>, assistant header
    assert (labels[answer_start : answer_end - 1] == ids[answer_start : answer_end - 1]).all()
    assert labels[answer_end - 1] == -100 and ids[answer_end - 2] == IM_END  # the "\n" after <|im_end|>
    assert ids[imgbos] == IMGBOS and ids[imgend] == IMGEND and imgend - imgbos == NUM_CODES + 1
    assert ((ids[imgbos + 1 : imgend] >= CODE0) & (ids[imgbos + 1 : imgend] < CODE0 + 64)).all()
    text = processor.tokenizer.decode([t for t in sample.labels if 0 <= t < V])
    assert text == "Done. <|im_end|>"


def test_intersyn_turns_put_each_image_after_its_text_and_flat_columns_read_the_same(dataset, processor):
    sample = sample_of(dataset, "intersyn")
    assert sample.input_ids == sample_of(dataset, "flat").input_ids
    assert len(sample.answers) == 2 and [t[2] for t in sample.targets] == [0, 1]
    for (start, end), (imgbos, imgend, _) in zip(sample.answers, sample.targets):
        text = processor.tokenizer.decode(sample.input_ids[start:imgbos])
        assert text in ("Once upon a time.", "The sky turned blue.")
        assert sample.input_ids[imgend + 1 : end] == [IM_END, 198]
    # The first answer's image is in the context of the second turn, exactly as generated.
    assert sample.labels[sample.targets[0][0]] == IMGBOS
    assert "caption" not in processor.tokenizer.decode(sample.input_ids) and "sun" not in processor.tokenizer.decode(
        sample.input_ids[sample.answers[0][0] :]
    )


def test_system_turn_replaces_the_default_system_message(dataset, processor):
    ids = sample_of(dataset, "system").input_ids
    assert processor.tokenizer.decode(ids).startswith("<|im_start|>system\nYou draw.<|im_end|>\n<|im_start|>user\n")
    assert processor.tokenizer.decode(sample_of(dataset, "t2i").input_ids).startswith(
        "<|im_start|>system\n你是书生·万象"
    )


def test_unconditional_sample_blanks_the_prompt_as_generate_does(dataset, checkpoint):
    model = ArmorForConditionalGeneration.from_pretrained(checkpoint)
    for record in ("t2i", "ti2ti", "intersyn"):
        sample = sample_of(dataset, record)
        for seed in range(4):
            blank = wohg_data.unconditional_sample(sample, IMGPAD, wohg_data.random.Random(seed))
            (start, end), ((imgbos, imgend, _),) = blank.answers[0], blank.targets
            assert blank.pixel_values is None and IMG_CONTEXT not in blank.input_ids
            assert blank.input_ids[start:end] == sample.input_ids[start:end] and len(blank.input_ids) == end
            prompt = torch.tensor([sample.input_ids[: imgbos + 1]])
            if start == imgbos:  # the answer starts with the image: the prompt is what generate() blanks
                expected, _ = model._unconditional_prompt(prompt, torch.ones_like(prompt), None, None)
                assert blank.input_ids[: imgbos + 1] == expected[0].tolist()
            assert set(blank.input_ids[:start]) == {IMGPAD}
            trained = [i for i, label in enumerate(blank.labels) if label != -100]
            assert trained == list(range(imgbos + 1, imgend + 1))  # codes and <imgend> only


def test_cfg_drop_probability_one_makes_every_image_sample_unconditional(data, processor, checkpoint):
    dropping = make_dataset(data, processor, checkpoint, cfg_drop_prob=1.0)
    for index, conversation in enumerate(dropping.conversations):
        sample = dropping.sample(index)
        assert (sample.input_ids[0] == IMGPAD) == bool(conversation.images(target=True))


def test_truncation_never_splits_an_image(dataset):
    sample = sample_of(dataset, "ti2ti")
    (imgbos, _, _), (img_start, _, _, _) = sample.targets[0], sample.inputs[0]
    cut = wohg_data.truncate(sample, imgbos + 5)
    assert len(cut.input_ids) == imgbos and not cut.targets and cut.pixel_values.shape[0] == 1
    cut = wohg_data.truncate(sample, img_start + 10)
    assert len(cut.input_ids) == img_start and cut.pixel_values is None and not cut.inputs


def test_collator_pads_right_and_keeps_tiles_in_row_order(dataset, processor):
    collator = wohg_data.build_collator(processor)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collator(items)
    tiles = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    assert torch.equal(batch["pixel_values"], torch.cat(tiles))
    assert batch["input_ids"].shape[1] % 8 == 0 and (batch["input_ids"] == IMG_CONTEXT).sum() == 256 * len(tiles)
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        assert batch["attention_mask"][row].sum() == size and (batch["labels"][row, size:] == -100).all()


def test_dummy_tile_for_sharded_training_changes_no_loss(dataset, processor, checkpoint):
    model = ArmorForConditionalGeneration.from_pretrained(checkpoint)
    items = [dataset[i] for i in range(len(dataset)) if dataset[i]["pixel_values"] is None][:3]
    plain = wohg_data.build_collator(processor)(items)
    dummy = wohg_data.build_collator(processor, dummy_image=True)(items)
    assert "pixel_values" not in plain and dummy["pixel_values"].shape == (1, 3, 448, 448)
    with torch.no_grad():
        plain_out, dummy_out = model(**plain), model(**dummy)
    assert torch.allclose(plain_out.text_loss, dummy_out.text_loss, atol=1e-6)
    assert torch.allclose(plain_out.image_loss, dummy_out.image_loss, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad data

BAD_RECORDS = {
    "missing image": (
        {
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes."}],
            "image": "images/nope.png",
        },
        r"image .*nope\.png does not exist",
    ),
    "corrupt image": (
        {
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes."}],
            "image": "broken.png",
        },
        r"input image .*broken\.png cannot be read",
    ),
    "more placeholders than images": (
        {
            "conversations": [{"from": "human", "value": "<image><image>Hi"}, {"from": "gpt", "value": "Yes."}],
            "image": ["images/red.png"],
        },
        r"more <image> placeholders than images",
    ),
    "unknown role": (
        {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]},
        r"turn 0 has unknown role 'robot'",
    ),
    "empty conversation": ({"conversations": []}, r"empty conversation"),
}


def bad_folder(root: Path, records: list[dict]) -> Path:
    write_images(root)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write_jsonl(root / "bad.jsonl", records)
    return root


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records_name_the_record_and_the_file(case, tmp_path, processor, checkpoint):
    record, message = BAD_RECORDS[case]
    folder = bad_folder(tmp_path, [RECORDS_A[0], {"id": "bad", **record}])
    with pytest.raises(wohg_data.RecordError, match=rf"bad\.jsonl:2 \(id=bad\): .*{message}"):
        make_dataset(folder, processor, checkpoint)


def test_unreadable_target_image_fails_tokenize_and_skip_counts_every_bad_record(tmp_path, processor, checkpoint):
    corrupt_target = {
        "id": "bad-target",
        "conversations": [{"from": "human", "value": "Draw."}, {"from": "gpt", "value": "<image>"}],
        "image": "broken.png",
    }
    folder = bad_folder(tmp_path, [RECORDS_A[0], corrupt_target, RECORDS_A[2]])
    with pytest.raises(wohg_data.RecordError, match=r"bad\.jsonl:2 \(id=bad-target\): target image .*broken\.png"):
        wohg_data.tokenize_images([folder], str(checkpoint), num_workers=0, progress=False, log=lambda _: None)
    bad = [{"id": "bad", **record} for record, _ in BAD_RECORDS.values()]
    write_jsonl(folder / "bad.jsonl", [RECORDS_A[0], corrupt_target, RECORDS_A[2], *bad])
    summary = wohg_data.tokenize_images(
        [folder], str(checkpoint), num_workers=0, skip_bad_records=True, progress=False, log=lambda _: None
    )
    assert (summary["encoded"], summary["bad"], summary["skipped_records"]) == (1, 1, 4)
    dataset = make_dataset(folder, processor, checkpoint, skip_bad_records=True)
    assert len(dataset) == 2 and len(dataset.skipped) == 6
    assert any("id=bad-target" in message for message in dataset.skipped)


def test_records_skipped_while_loading_are_counted_once_also_from_worker_processes(tmp_path, processor, checkpoint):
    corrupt_input = {
        "id": "bad-input",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes."}],
        "image": "broken.png",
    }
    folder = bad_folder(tmp_path, [RECORDS_A[0], corrupt_input, RECORDS_A[1]])
    dataset = make_dataset(folder, processor, checkpoint, skip_bad_records=True, check_images=False)
    assert len(dataset) == 3 and dataset.skipped_count() == 0  # unseen until loaded
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=list)
    for _ in range(2):  # two epochs: met twice, counted once
        assert len(list(loader)) == 3
    assert dataset.skipped_count() == 1 and not dataset.skipped  # the worker's flag reached this process
    assert len([dataset[i] for i in range(3)]) == 3
    assert dataset.skipped_count() == 1 and len(dataset.skipped) == 1 and "id=bad-input" in dataset.skipped[0]
    # ... and the training summary counts it (data loaded in a worker process)
    output = tmp_path / "run"
    argv = ["--stage", "1", "--model", str(checkpoint), "--data", str(folder), "--output-dir", str(output)]
    options = ["--max-steps", "2", "--per-device-train-batch-size", "3", "--dataloader-num-workers", "1"]
    run([*argv, *options, "--save-steps", "1000", "--check-images", "false", "--skip-bad-records"])
    assert summary(output)["skipped_records"] == 1


# ---------------------------------------------------------------------------------------------- training


class NoVQGANEncoder:
    """Training must read codes from the cache: any VQGAN encoding while this is active fails the test."""

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(ArmorVQGANModel, "encode", lambda *a, **k: pytest.fail("the VQGAN encoder ran in training"))
        return self

    def __exit__(self, *exc):
        self.patch.undo()


def run(argv: list[str], callbacks: tuple = ()) -> list[Path]:
    with NoVQGANEncoder():
        return train_wohg.main(argv, callbacks=callbacks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, checkpoint) -> list[Path]:
    """Stages 1, 2, 3 in order with the default presets (trainable parts, loss weights), faster learning rates."""
    folder = tmp_path_factory.mktemp("runs")
    config = {
        "max_steps": 24,
        "per_device_train_batch_size": 4,
        "logging_steps": 4,
        "save_steps": 1000,
        "warmup_ratio": 0.0,
        "dataloader_num_workers": 0,
        "stage1": {"learning_rate": 0.05},
        "stage2": {"learning_rate": 0.005},
        "stage3": {"learning_rate": 0.005},
    }
    (folder / "wohg.yaml").write_text(json.dumps(config))  # JSON is YAML
    argv = ["--stage", "all", "--model", str(checkpoint), "--data", str(data), "--output-dir", str(folder)]
    return run([*argv, "--config", str(folder / "wohg.yaml")])


def summary(folder: Path) -> dict:
    return json.loads((folder / train_wohg.SUMMARY_FILE).read_text())


def logged(folder: Path, key: str) -> list[float]:
    return [entry[key] for entry in summary(folder)["log_history"] if key in entry and "train_runtime" not in entry]


def test_loss_falls_in_every_stage(trained):
    stage1, stage2, stage3 = trained
    assert [summary(folder)["global_step"] for folder in trained] == [24, 24, 24]
    text = logged(stage1, "text_loss")
    assert len(text) == 6 and text[-1] < text[0] - 0.3
    image = logged(stage2, "image_loss")
    assert image[-1] < image[0] - 0.5
    assert logged(stage3, "loss")[-1] < logged(stage3, "loss")[0] - 0.1
    assert summary(stage2)["options"]["text_loss_weight"] == 0 and summary(stage2)["options"]["cfg_drop_prob"] == 0.1


TRAINED_PREFIXES = {
    1: ("image_token_embeddings.", "adapter.", "imgbos_head."),
    2: ("image_token_embeddings.", "adapter.", "visual_head."),
    3: ("image_token_embeddings.", "adapter.", "visual_head.", "imgbos_head."),
}


def test_only_the_stage_parts_change_and_the_rest_is_bitwise_equal(trained, checkpoint):
    before = load_file(str(checkpoint / "model.safetensors"))
    for stage, folder in enumerate(trained, start=1):
        after = load_file(str(folder / "model.safetensors"))
        assert sorted(after) == sorted(before)
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert all(name.startswith(TRAINED_PREFIXES[stage]) for name in changed), changed
        for prefix in TRAINED_PREFIXES[stage]:
            assert any(name.startswith(prefix) for name in changed), prefix
        for prefix in ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head."):
            names = [name for name in before if name.startswith(prefix)]
            assert names and all(torch.equal(before[name], after[name]) for name in names), prefix
        vqgan_before = load_file(str(checkpoint / "vqgan" / "model.safetensors"))
        vqgan_after = load_file(str(folder / "vqgan" / "model.safetensors"))
        assert all(torch.equal(vqgan_before[name], vqgan_after[name]) for name in vqgan_before)
        before = after


def test_base_model_text_logits_are_unchanged_after_the_three_stages(trained, checkpoint, data):
    original = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    final = AutoModel.from_pretrained(trained[-1], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(trained[-1], trust_remote_code=True)
    image_prompt = processor(
        text=build_internvl_prompt("<image>\nWhat is this photo about?"), images=[data / "images" / "red.png"]
    )
    text_prompt = processor(text=build_internvl_prompt("What is two plus two?"))
    with torch.no_grad():
        for inputs in (image_prompt, text_prompt):
            inputs = {k: v for k, v in inputs.items() if k != "num_patches_list"}
            before, after = original(**inputs).logits, final(**inputs).logits
            assert torch.equal(before[..., :V], after[..., :V])
            assert not torch.equal(before[..., V], after[..., V])  # the <imgbos> score did train


def test_output_is_a_complete_checkpoint_folder(trained, checkpoint):
    folder = trained[-1]
    for name in (*train_wohg.CODE_FILES, "config.json", "generation_config.json", "processor_config.json"):
        assert (folder / name).is_file(), name
    assert (folder / "tokenizer").is_dir() and (folder / "vqgan" / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    source = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == source["auto_map"]
    assert (config["text_loss_weight"], config["image_loss_weight"]) == (1.0, 1.0)  # restored after the stage
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["guidance_scale"], generation["eos_token_id"], generation["image_top_k"]) == (3.0, IM_END, 2000)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    answer = model.generate(torch.tensor([[1, 2, 3]]), modality="image", max_new_tokens=NUM_CODES + 2, seed=0)
    assert answer[0, 3] == IMGBOS and answer[0, 4 + NUM_CODES] == IMGEND
    rows = {row["part"]: row for row in summary(trained[1])["parameters"]}
    assert rows["adapter"]["trainable"] == rows["adapter"]["parameters"] > 0 and rows["lm_head"]["trainable"] == 0


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(tmp_path, data, checkpoint):
    argv = ["--stage", "2", "--model", str(checkpoint), "--data", str(data), "--max-steps", "4", "--save-steps", "2"]
    argv += ["--logging-steps", "1", "--per-device-train-batch-size", "2", "--learning-rate", "0.005"]
    argv += ["--cfg-drop-prob", "0.5", "--dataloader-num-workers", "0", "--save-total-limit", "3"]
    whole = tmp_path / "whole"
    run([*argv, "--output-dir", str(whole)])
    parts = tmp_path / "parts"
    run([*argv, "--output-dir", str(parts)], callbacks=(StopAt(2),))
    assert sorted(p.name for p in parts.glob("checkpoint-*")) == ["checkpoint-2"]
    run([*argv, "--output-dir", str(parts), "--resume-from-checkpoint", "auto"])

    state = json.loads((parts / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in summary(parts)["log_history"] if "loss" in e] == [
        1,
        2,
        3,
        4,
    ]
    assert logged(parts, "loss") == logged(whole, "loss")  # steps 1-2 from the first run, 3-4 after resuming
    optimizers = [torch.load(f / "checkpoint-4" / "optimizer.pt", weights_only=True) for f in (whole, parts)]
    for key, value in optimizers[0]["state"].items():
        other = optimizers[1]["state"][key]
        assert value["step"] == other["step"] == 4
        assert torch.allclose(value["exp_avg"], other["exp_avg"], atol=1e-7)
        assert torch.allclose(value["exp_avg_sq"], other["exp_avg_sq"], atol=1e-10)
    weights = [load_file(str(f / "model.safetensors")) for f in (whole, parts)]
    assert all(torch.allclose(weights[0][name], weights[1][name], atol=1e-6) for name in weights[0])


def test_gradient_checkpointing_gives_the_same_loss(tmp_path, data, checkpoint):
    argv = ["--stage", "3", "--model", str(checkpoint), "--data", str(data), "--max-steps", "2"]
    argv += ["--logging-steps", "1", "--dataloader-num-workers", "0", "--cfg-drop-prob", "0", "--max-tiles", "2"]
    run([*argv, "--output-dir", str(tmp_path / "plain")])
    run([*argv, "--output-dir", str(tmp_path / "checkpointed"), "--gradient-checkpointing"])
    plain, checkpointed = logged(tmp_path / "plain", "loss"), logged(tmp_path / "checkpointed", "loss")
    assert len(plain) == 2 and plain == pytest.approx(checkpointed, abs=1e-5)
    # --max-tiles limits the training data only; the checkpoint keeps InternVL2.5's tiling for inference.
    assert json.loads((tmp_path / "plain" / "preprocessor_config.json").read_text())["max_patches"] == 12


# ---------------------------------------------------------------------------------------------- options, parameters


def test_options_come_from_preset_then_config_file_then_command_line():
    config = {"learning_rate": 1e-3, "stage2": {"learning_rate": 2e-3, "cfg_drop_prob": 0.2}, "max-steps": 7}
    cli = {"model": "m", "data": ["d"], "output_dir": "o", "cfg_drop_prob": "0.3"}
    stage2 = train_wohg.resolve_options(2, cli, config)
    assert (stage2["learning_rate"], stage2["cfg_drop_prob"], stage2["max_steps"]) == (2e-3, 0.3, 7)
    assert stage2["trainable"] == ["image_token_embeddings", "adapter", "visual_head"]
    stage1 = train_wohg.resolve_options(1, {**cli, "train_lm_head": "true"}, {})
    assert (stage1["learning_rate"], stage1["image_loss_weight"]) == (4e-5, 0.0)
    assert stage1["trainable"] == ["image_token_embeddings", "adapter", "imgbos_head", "lm_head"]
    assert train_wohg.resolve_options(3, cli, {})["learning_rate"] == 5e-5
    with pytest.raises(ValueError, match="Unknown option 'lr'"):
        train_wohg.resolve_options(1, cli, {"lr": 1})
    with pytest.raises(ValueError, match="stage 2 has none"):
        train_wohg.resolve_options(2, {**cli, "train_lm_head": "true"}, {})
    with pytest.raises(ValueError, match="VQGAN is never trained"):
        train_wohg.resolve_options(3, {**cli, "trainable": ["vqgan"]}, {})
    with pytest.raises(ValueError, match="--output-dir"):
        train_wohg.resolve_options(3, {"model": "m", "data": ["d"]}, {})


def test_stage_1_trains_the_imgbos_score_its_input_the_adapter_and_the_new_rows_only():
    """The <imgbos> score reads the adapter's output, so "what to generate" trains the adapter; the base stays frozen.

    Every trainable parameter must get a gradient from the text loss alone (DDP runs without find_unused_parameters).
    """
    model = tiny_model(text_loss_weight=1.0, image_loss_weight=0.0).train()
    names = train_wohg.set_trainable(model, train_wohg.STAGES[1]["trainable"])
    parts = {"image_token_embeddings", "adapter", "imgbos_head"}
    assert names == [name for name, _ in model.named_parameters() if train_wohg.part_of(name) in parts]
    assert {train_wohg.part_of(name) for name in names} == parts
    ids = torch.tensor([[1, 7, 8, TINY_V, TINY_V + 3, TINY_V + 9, TINY_V + 1, 11, 5]])
    labels = ids.clone()
    labels[:, :2] = -100
    model(ids, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in names), name
        assert parameter.grad is None or parameter.grad.abs().sum() > 0, name


def test_stage_all_checks_every_stages_options_before_training_any(tmp_path, monkeypatch):
    monkeypatch.setattr(train_wohg, "train_stage", lambda *a, **k: pytest.fail("a stage trained"))
    output = tmp_path / "runs"
    argv = ["--stage", "all", "--model", "m", "--data", "d", "--output-dir", str(output)]
    for bad, message in (
        ({"stage3": {"cfg_drop_prob": 2}}, "--cfg-drop-prob must be in"),
        ({"stage3": {"frozen_dtype": "float8"}}, "--frozen-dtype must be"),
        ({"stage2": {"deepspeed": str(tmp_path / "missing.json")}}, "missing.json"),
    ):
        (tmp_path / "wohg.yaml").write_text(json.dumps(bad))
        with pytest.raises((ValueError, OSError), match=message):
            train_wohg.main([*argv, "--config", str(tmp_path / "wohg.yaml")])
        assert not output.exists()


def test_fsdp_wraps_the_layer_classes_the_model_holds_and_the_trainer_names_none(checkpoint):
    fsdp = json.loads((REPO_ROOT / "configs" / "fsdp.json").read_text())
    assert fsdp["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "transformer_layer_cls_to_wrap" not in fsdp
    source = (REPO_ROOT / "train_wohg.py").read_text()
    assert "transformer_layer_cls_to_wrap" not in source and "_no_split_modules" not in source
    assert "fsdp_config" in source  # FSDP is still wired: accelerate then wraps the model's _no_split_modules
    model = ArmorForConditionalGeneration.from_pretrained(checkpoint)
    held = {type(module).__name__ for module in model.modules()}
    assert len(model._no_split_modules) > 1 and set(model._no_split_modules) <= held


def test_config_examples_resolve_and_sharded_launches_get_the_dummy_tile():
    configs = REPO_ROOT / "configs"
    cli = {"model": "m", "data": ["d"], "output_dir": "o"}
    example = train_wohg.read_config_file(str(configs / "wohg_example.yaml"))
    stages = [train_wohg.resolve_options(stage, cli, example) for stage in (1, 2, 3)]
    assert [options["learning_rate"] for options in stages] == [4e-5, 1e-4, 5e-5]
    assert [options["cfg_drop_prob"] for options in stages] == [0.0, 0.1, 0.1]
    assert all(options["gradient_accumulation_steps"] == 4 and options["max_tiles"] == 6 for options in stages)
    launches = {
        "plain": ({}, (True, "keep", False)),
        "deepspeed_zero2.json": ({"deepspeed": str(configs / "deepspeed_zero2.json")}, (True, "keep", False)),
        "deepspeed_zero3.json": ({"deepspeed": str(configs / "deepspeed_zero3.json")}, (True, "keep", True)),
        "fsdp.json": ({"fsdp_config": str(configs / "fsdp.json")}, (True, "float32", True)),
    }
    for name, (extra, expected) in launches.items():
        options = train_wohg.resolve_options(2, {**cli, **extra}, {})
        assert train_wohg.runtime_settings(options, cuda_bf16=True) == expected, name
    assert train_wohg.runtime_settings(train_wohg.resolve_options(2, cli, {}), cuda_bf16=False) == (
        False,
        "float32",
        False,
    )
    for name in ("accelerate_multi_gpu.yaml", "accelerate_multi_node.yaml"):
        launcher = train_wohg.read_config_file(str(configs / name))
        assert launcher["distributed_type"] == "MULTI_GPU" and launcher["num_processes"] % 8 == 0


def test_internvl2_5_8b_shapes_train_about_0_9b_parameters_in_stages_2_and_3():
    from armor.benchmarks.bench_train import meta_model_parameter_rows

    rows = {stage: {row["part"]: row for row in meta_model_parameter_rows(stage)} for stage in (1, 2, 3)}
    trainable = {stage: sum(row["trainable"] for row in rows[stage].values()) for stage in rows}
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # q, o; k, v (8 KV heads); MLP; 2 norms
    assert rows[3]["adapter"]["trainable"] == 4 * layer + 4096  # 4 layers of InternLM2.5-7B's kind + final norm
    assert rows[3]["image_token_embeddings"]["trainable"] == (3 + 8192) * 4096
    assert rows[3]["visual_head"]["trainable"] == (2 + 8192) * 4096 and rows[3]["imgbos_head"]["trainable"] == 4096
    assert 0.90e9 < trainable[2] < trainable[3] < 0.95e9
    # Stage 1 trains the adapter too (the <imgbos> score reads it), but not the visual head.
    assert trainable[1] == (3 + 8192) * 4096 + 4096 + 4 * layer + 4096 == 906_022_912
    assert rows[1]["visual_head"]["trainable"] == 0
    assert rows[3]["llm_layers"]["parameters"] > 6.9e9 and rows[3]["llm_layers"]["trainable"] == 0
    assert rows[3]["vision_tower"]["trainable"] == rows[3]["projector"]["trainable"] == 0


# ---------------------------------------------------------------------------------------------- GPU scripts, on CPU


def test_bench_train_smoke_times_a_stage_2_step_and_writes_json(tmp_path):
    from armor.benchmarks import bench_train

    bench_train.main(["--smoke", "--out", str(tmp_path / "bench_train.json")])
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert [row["gradient_checkpointing"] for row in result["rows"]] == [False, True]
    assert all(row["tokens_per_s"] > 0 and row["llm_layers"] == 2 and row["loss"] > 0 for row in result["rows"])
    assert 0.90e9 < result["trainable_parameters_full_model"] < 0.95e9 or result["shapes"] == "tiny (smoke)"


def test_tiny_stage2_script_smoke_trains_checks_and_draws(tmp_path):
    from armor.scripts import tiny_stage2

    result = tiny_stage2.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert result["steps"] == 6 and result["frozen_weights_bitwise_equal"]
    assert result["kinds"] == {"t2i": 4, "t2ti": 4, "ti2ti": 4}
    assert Image.open(tmp_path / "out" / "sample.png").size == (256, 256)
    assert len((tmp_path / "out" / "loss.csv").read_text().splitlines()) == 7
