"""benchmarks/shapeworld_eval.py and benchmarks/shapeworld_sampling.py on the shipped model `armor-shapeworld/`."""

import json
import sys

import pytest
from conftest import REPO_ROOT
from PIL import Image

from shapeworld.data import make_examples

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import shapeworld_eval  # noqa: E402
import shapeworld_sampling  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    model, processor = shapeworld_eval.load_armor(str(REPO_ROOT / "armor-shapeworld"), "cpu")
    return model, shapeworld_eval.Evaluator(processor, "cpu", batch_size=4)


def test_answer_modality_names_what_an_answer_holds():
    image = Image.new("RGB", (8, 8))
    assert shapeworld_eval.answer_modality(["a large diamond"]) == "text"
    assert shapeworld_eval.answer_modality([image]) == "image"
    assert shapeworld_eval.answer_modality(["Here.", image]) == "text+image"
    assert shapeworld_eval.answer_modality([" ", image]) == "image"  # blank text is no text
    assert shapeworld_eval.answer_modality([]) == "none"


def test_drawings_are_seeded_and_settings_change_them(shipped):
    model, evaluator = shipped
    examples = make_examples("t2i", 2, "train", shapeworld_sampling.VALIDATION_SEED)
    rates, scored, images_per_s = shapeworld_eval.drawing(evaluator, model, examples)
    again, scored_again, _ = shapeworld_eval.drawing(evaluator, model, examples)
    assert set(rates) == set(shapeworld_eval.CHECKS) and images_per_s > 0
    assert [image.size for _, image, _ in scored] == [(256, 256), (256, 256)]
    # Seeded: the same settings draw the same pictures.
    assert rates == again
    assert [image.tobytes() for _, image, _ in scored] == [image.tobytes() for _, image, _ in scored_again]
    # Other settings draw other pictures.
    _, hotter, _ = shapeworld_eval.drawing(evaluator, model, examples, image_temperature=1.0, image_top_k=32)
    assert [image.tobytes() for _, image, _ in hotter] != [image.tobytes() for _, image, _ in scored]


def test_sampling_sweep_ranks_the_settings_and_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.setattr(shapeworld_sampling, "GUIDANCE_SCALES", (1.5,))
    monkeypatch.setattr(shapeworld_sampling, "TEMPERATURES", (0.5,))
    rows = shapeworld_sampling.main(["--count", "2", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path)])
    settings = {(row["guidance_scale"], row["image_temperature"], row["image_top_k"]) for row in rows}
    assert settings == {(3.0, 1.0, 32), (1.5, 0.5, 8)}
    assert [row["pass"] for row in rows] == sorted((row["pass"] for row in rows), reverse=True)
    assert json.loads((tmp_path / "shapeworld_sampling.json").read_text()) == rows
    table = (tmp_path / "shapeworld_sampling.md").read_text().splitlines()
    assert table[2].startswith("| guidance | temperature | top-k | objects_present")
    assert len(table) == 4 + len(rows)


def test_sampling_sweep_refuses_an_empty_run(tmp_path):
    with pytest.raises(SystemExit):
        shapeworld_sampling.main(["--count", "0", "--out", str(tmp_path)])
