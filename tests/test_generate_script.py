"""The README's main command, `scripts/generate.py`, on the repository's tiny default model."""

import sys

import pytest
from conftest import REPO_ROOT
from PIL import Image

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import generate  # noqa: E402


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default") / "armor-tiny"
    original = generate.DEFAULT_MODEL
    generate.DEFAULT_MODEL = folder
    yield folder
    generate.DEFAULT_MODEL = original


def test_image_request_saves_one_png_of_the_configured_size(default_model, tmp_path, capsys):
    segments = generate.main(["Draw a red circle.", "--modality", "image", "--output-dir", str(tmp_path)])
    assert (default_model / "config.json").is_file()  # converted from the fixtures on first use
    assert [type(segment) for segment in segments] == [Image.Image]
    with Image.open(tmp_path / "image_1.png") as saved:
        assert saved.size == (512, 512)
    assert f"saved to {tmp_path / 'image_1.png'}" in capsys.readouterr().out


def test_text_request_with_an_input_image_saves_no_png(default_model, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (600, 300), "red").save(photo)
    segments = generate.main(
        [
            "What is this?",
            "--image",
            str(photo),
            "--modality",
            "text",
            "--max-new-tokens",
            "8",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert segments and all(isinstance(segment, str) for segment in segments)
    assert not list((tmp_path / "out").glob("*.png"))


def test_missing_input_image_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["What is this?", "--image", str(tmp_path / "nope.png")])
    assert "nope.png: no such file" in capsys.readouterr().err
