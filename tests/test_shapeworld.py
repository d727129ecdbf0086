"""Shape world: scenes, images, the checker that reads them back, conversation records and the world's tokenizer."""

import filecmp
import io
import json
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from shapeworld.checker import detect, score
from shapeworld.data import (
    ADDED_TOKENS,
    KINDS,
    MODALITIES,
    drawing_request,
    make_examples,
    read_records,
    train_tokenizer,
    world_texts,
    write_dataset,
)
from shapeworld.world import (
    BACKGROUND,
    COLOURS,
    HELD_OUT_COMBINATIONS,
    SHAPES,
    SPLITS,
    Scene,
    SceneObject,
    describe,
    layout,
    render,
    sample_scene,
    scene_split,
)

NUM_SCENES = 120
NUM_DEGRADED = 60


def scene_key(objects) -> list[tuple[str, str, str, str]]:
    return sorted((o.shape, o.colour, o.size, o.position) for o in objects)


def scenes(seed: int, count: int = NUM_SCENES) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, SPLITS[i % 3]) for i in range(count)]


def jpeg(image: Image.Image, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def blur_and_noise(image: Image.Image, seed: int) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, 8.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# World
# ---------------------------------------------------------------------------------------------------------------------


def test_describe_names_every_object_in_reading_order():
    scene = Scene(
        (
            SceneObject("square", "blue", "small", 128, 130),
            SceneObject("circle", "red", "large", 43, 43),
            SceneObject("star", "orange", "large", 213, 215),
        )
    )
    assert describe(scene) == (
        "A large red circle at the top left, a small blue square in the centre and a large orange star at the bottom "
        "right."
    )
    assert (
        describe(Scene((SceneObject("triangle", "orange", "small", 40, 128),)))
        == "A small orange triangle on the left."
    )


def test_sample_scene_is_seeded_and_round_trips_through_dicts():
    first, second = scenes(3, 20), scenes(3, 20)
    assert first == second
    assert scenes(4, 20) != first
    for scene in first:
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert 1 <= len(scene.objects) <= 4


def test_scene_rejects_overlapping_objects_and_unknown_words():
    with pytest.raises(ValueError, match="gap of at least 8 px"):
        Scene((SceneObject("circle", "red", "large", 60, 60), SceneObject("square", "blue", "large", 120, 60)))
    with pytest.raises(ValueError, match="Unknown colour 'pink'"):
        SceneObject("circle", "pink", "large", 60, 60)
    with pytest.raises(ValueError, match="leaves the 256px canvas"):
        SceneObject("circle", "red", "large", 20, 60)
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        sample_scene(random.Random(0), "dev")


def test_splits_hold_out_combinations_and_never_share_a_scene():
    rng = random.Random(0)
    by_split = {split: [sample_scene(rng, split) for _ in range(300)] for split in SPLITS}
    for split, sampled in by_split.items():
        assert all(scene_split(s) == split for s in sampled)
        held = [any(o.combination in HELD_OUT_COMBINATIONS for o in s.objects) for s in sampled]
        assert all(held) if split == "heldout" else not any(held)
        assert sorted({len(s.objects) for s in sampled}) == [1, 2, 3, 4]
    train = {describe(s) for s in by_split["train"]}
    test = {describe(s) for s in by_split["test"]}
    assert not train & test
    assert len(HELD_OUT_COMBINATIONS) == 5
    assert len({c for c, _ in HELD_OUT_COMBINATIONS}) == len({s for _, s in HELD_OUT_COMBINATIONS}) == 5


def test_render_draws_flat_palette_colours_only():
    palette = {tuple(c) for c in COLOURS.values()} | {BACKGROUND}
    for scene in scenes(1, 30):
        image = render(scene)
        assert image.size == (256, 256) and image.mode == "RGB"
        pixels = np.asarray(image)
        packed = np.unique(pixels.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))
        colours = {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}
        assert colours <= palette
        assert colours == {BACKGROUND} | {COLOURS[o.colour] for o in scene.objects}
        for o in scene.objects:
            assert tuple(pixels[o.y, o.x].tolist()) == COLOURS[o.colour]
    assert render(scenes(1, 1)[0], size=512).size == (512, 512)


# ---------------------------------------------------------------------------------------------------------------------
# Checker
# ---------------------------------------------------------------------------------------------------------------------


def test_detect_recovers_every_clean_scene_exactly():
    recovered = 0
    for scene in scenes(10):
        detected = detect(render(scene))
        assert scene_key(detected) == scene_key(scene.objects)
        for o in scene.objects:
            match = next(d for d in detected if d.position == o.position)
            assert abs(match.x - o.x) <= 2.0 and abs(match.y - o.y) <= 2.0  # the opening trims a triangle's apex
        recovered += 1
    assert recovered == NUM_SCENES


def test_detect_reads_every_shape_colour_and_size():
    for colour in COLOURS:
        for size in ("small", "large"):
            scene = layout(random.Random(0), [(shape, colour, size) for shape in SHAPES], cells=[0, 2, 4, 6, 8])
            assert scene_key(detect(render(scene))) == scene_key(scene.objects)


@pytest.mark.parametrize("degrade", ["jpeg60", "blur1_noise8", "render512"])
def test_detect_survives_mild_degradation(degrade):
    for index, scene in enumerate(scenes(20, NUM_DEGRADED)):
        if degrade == "jpeg60":
            image = jpeg(render(scene))
        elif degrade == "blur1_noise8":
            image = blur_and_noise(render(scene), index)
        else:
            image = render(scene, size=512)
        assert scene_key(detect(image)) == scene_key(scene.objects), (degrade, index, describe(scene))


def test_detected_scene_describes_like_the_truth():
    for scene in scenes(30, 40):
        detected = detect(jpeg(render(scene)))
        read = Scene(tuple(SceneObject(d.shape, d.colour, d.size, round(d.x), round(d.y)) for d in detected))
        assert describe(read) == describe(scene)


def test_score_passes_the_right_drawing_and_fails_wrong_ones():
    rng = random.Random(5)
    request = drawing_request(rng, "train", task="relation")
    spec = request.spec
    a, b = (o for o in request.scene.objects)
    assert score(spec, render(request.scene))["pass"] is True

    other = next(c for c in COLOURS if c not in (a.colour, b.colour))
    recoloured = score(spec, render(Scene((SceneObject(a.shape, other, a.size, a.x, a.y), b))))
    assert recoloured["pass"] is False and recoloured["colours"] is False and recoloured["objects_present"] is True

    missing = score(spec, render(Scene((b,))))
    assert missing["pass"] is False and missing["counts"] is False

    swapped = Scene(
        (SceneObject(a.shape, a.colour, a.size, b.x, b.y), SceneObject(b.shape, b.colour, b.size, a.x, a.y))
    )
    result = score(spec, render(swapped))
    assert result["colours"] is True and result["counts"] is True
    assert result["relations"] is False and result["pass"] is False

    free = next(cell for cell in range(9) if cell not in {a.cell, b.cell})
    extra = layout(rng, [("square", "orange", "small")], cells=[free]).objects[0]
    extra_result = score(spec, render(Scene((a, b, extra))))
    assert extra_result["no_extra"] is False and extra_result["pass"] is False
    assert extra_result["relations"] is True


def test_score_checks_counts_sizes_and_positions():
    rng = random.Random(2)
    spec = {
        "objects": [{"shape": "circle", "colour": "red", "size": None, "position": None, "count": 3}],
        "relations": [],
        "exact": True,
    }
    three = layout(rng, [("circle", "red", "small")] * 3)
    assert score(spec, render(three))["pass"] is True
    two = Scene(three.objects[:2])
    assert score(spec, render(two))["counts"] is False

    spec = {
        "objects": [{"shape": "star", "colour": "green", "size": "large", "position": "top left", "count": 1}],
        "relations": [],
        "exact": True,
    }
    assert score(spec, render(layout(rng, [("star", "green", "large")], cells=[0])))["pass"] is True
    wrong_place = score(spec, render(layout(rng, [("star", "green", "large")], cells=[8])))
    assert wrong_place["positions"] is False and wrong_place["sizes"] is True and wrong_place["pass"] is False
    wrong_size = score(spec, render(layout(rng, [("star", "green", "small")], cells=[0])))
    assert wrong_size["sizes"] is False and wrong_size["positions"] is True and wrong_size["pass"] is False
    with pytest.raises(ValueError, match="Unknown relation"):
        score({**spec, "relations": [{"subject": 0, "relation": "near", "object": 0}]}, render(two))


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------

COUNTS = {"ti2t": 12, "t2t": 8, "t2i": 10, "t2ti": 6, "ti2ti": 6}


def test_write_dataset_is_deterministic(tmp_path):
    first = write_dataset(tmp_path / "a", COUNTS, "train", seed=7)
    second = write_dataset(tmp_path / "b", COUNTS, "train", seed=7)
    other = write_dataset(tmp_path / "c", COUNTS, "train", seed=8)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(images) == 12 + 10 + 6 + 2 * 6
    assert all(filecmp.cmp(tmp_path / "a" / "images" / n, tmp_path / "b" / "images" / n, False) for n in images)
    records = read_records(tmp_path / "a")
    assert [r["id"] for r in records[:2]] == ["train-ti2t-000000", "train-ti2t-000001"]
    assert {kind: sum(r["meta"]["kind"] == kind for r in records) for kind in KINDS} == COUNTS


def test_records_load_in_wohg_data_as_their_kind(tmp_path):
    import wohg_data

    path = write_dataset(tmp_path, COUNTS, "heldout", seed=0)
    conversations, skipped = wohg_data.read_conversations([path])
    records = read_records(path)
    assert skipped == [] and len(conversations) == len(records) == sum(COUNTS.values())
    for conversation, record in zip(conversations, records):
        meta = record["meta"]
        assert conversation.kind == meta["kind"]
        assert meta["modality"] == MODALITIES[meta["kind"]]
        assert len(conversation.images(target=True)) == meta["image_roles"].count("target")
        assert len(conversation.images(target=False)) == meta["image_roles"].count("input")
        assert len(record.get("image", [])) == len(meta["scenes"])


def test_drawing_specs_pass_on_their_own_targets_and_answers_are_canonical(tmp_path):
    path = write_dataset(tmp_path, {"ti2t": 40, "t2i": 30, "t2ti": 15, "ti2ti": 15}, "train", seed=1)
    for record in read_records(path):
        meta = record["meta"]
        images = [Image.open(tmp_path / p) for p in record.get("image", [])]
        if meta["spec"] is not None:
            target = images[meta["image_roles"].index("target")]
            assert score(meta["spec"], target)["pass"] is True, record["id"]
        if meta["kind"] == "ti2t":
            answer = meta["answer"]
            assert record["conversations"][1]["value"] == answer
            if meta["task"] == "describe":
                assert answer == describe(Scene.from_dict(meta["scenes"][0]))
            else:
                assert re.fullmatch(r"[a-z0-9 ]+", answer), answer
        if meta["kind"] in ("t2ti", "ti2ti"):
            assert record["conversations"][1]["value"] == meta["answer"] + "\n<image>"


def test_held_out_combinations_appear_only_in_the_heldout_split():
    phrases = [f"{colour} {shape}" for colour, shape in HELD_OUT_COMBINATIONS]
    for split in ("train", "test"):
        for kind in KINDS:
            for example in make_examples(kind, 25, split, seed=0):
                text = example.human_value + " " + example.response
                assert not any(p in text for p in phrases), (example.id, text)
                assert example.heldout_combinations == []
                assert all(scene_split(s) == split for s in example.scenes)
    for kind in ("t2i", "t2ti", "ti2ti"):
        examples = make_examples(kind, 25, "heldout", seed=0)
        assert all(e.heldout_combinations for e in examples)
        assert all(scene_split(e.scenes[-1]) == "heldout" for e in examples)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    texts = world_texts(seed=0, count_per_kind=20)
    folder = tmp_path_factory.mktemp("tokenizer")
    return texts, folder, train_tokenizer(texts, folder)


def test_tokenizer_round_trips_the_world_and_has_internvl_tokens(world_tokenizer, tmp_path):
    from transformers import Qwen2Tokenizer

    texts, folder, vocab_size = world_tokenizer
    assert 300 < vocab_size < 2000
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    assert len(tokenizer) == vocab_size
    base = vocab_size - len(ADDED_TOKENS)
    assert tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS)) == list(range(base, vocab_size))
    assert tokenizer.convert_tokens_to_ids(["!", "Ġ", "Ċ"]) == [0, 220, 198]  # GPT-2 / Qwen2 byte order
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert len(tokenizer.encode("A large red circle at the top left.", add_special_tokens=False)) == 9
    # The same texts give the same files.
    assert train_tokenizer(texts, tmp_path) == vocab_size
    assert (tmp_path / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_world_tokenizer_converts_and_runs_the_chat_template(world_tokenizer):
    from armor.convert_tokenizer import convert_tokenizer
    from armor.processing_armor import ArmorProcessor

    _, folder, vocab_size = world_tokenizer
    tokenizer = convert_tokenizer(folder, vocab_size)
    assert tokenizer.convert_tokens_to_ids(["<imgbos>", "<imgend>", "<imgpad>"]) == [
        vocab_size,
        vocab_size + 1,
        vocab_size + 2,
    ]
    processor = ArmorProcessor(tokenizer=tokenizer, num_image_codes=256)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(text=prompt, images=[render(scenes(0, 1)[0])])["input_ids"][0].tolist()
    base = vocab_size - len(ADDED_TOKENS)
    im_start, im_end, img, img_end, context = base + 1, base + 2, base + 3, base + 4, base + 5
    assert ids[0] == im_start and ids.count(context) == 256 and ids.count(img) == ids.count(img_end) == 1
    assert ids.count(im_end) == 2
    assert tokenizer.decode(ids[ids.index(img_end) + 1 :]) == (
        "\nWhat colour is the star?<|im_end|>\n<|im_start|>assistant\n"
    )
