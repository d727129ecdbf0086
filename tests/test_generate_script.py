"""The README's main command, `scripts/generate.py`, on the repository's default model `armor-shapeworld/`."""

import sys

import pytest
from conftest import REPO_ROOT
from PIL import Image

from armor.shapeworld.checker import detect, score
from armor.shapeworld.world import Scene, SceneObject, render

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import generate  # noqa: E402


def test_drawing_request_is_answered_with_one_png_of_the_models_size(tmp_path, capsys):
    segments = generate.main(["Draw two green stars.", "--output-dir", str(tmp_path)])  # modality auto, seed 0
    assert [type(segment) for segment in segments] == [Image.Image]  # the model chose to draw, and only to draw
    with Image.open(tmp_path / "image_1.png") as saved:
        assert saved.size == (256, 256)
        drawn = saved.convert("RGB")
    # The drawing passes the checker: two green stars and nothing else (seed 0; the model passes about half of the
    # seen prompts, see the README).
    verdict = score({"objects": [{"shape": "star", "colour": "green", "count": 2}], "exact": True}, drawn)
    assert verdict["pass"], verdict["detected"]
    assert [(found.shape, found.colour) for found in detect(drawn)] == [("star", "green"), ("star", "green")]
    output = capsys.readouterr()
    assert f"saved to {tmp_path / 'image_1.png'}" in output.out
    assert "256/256" in output.err  # the progress bar over the image tokens


def test_question_about_an_input_image_is_answered_in_text(tmp_path):
    picture = tmp_path / "scene.png"
    scene = Scene([SceneObject("square", "purple", "large", 60, 60), SceneObject("circle", "red", "small", 190, 190)])
    render(scene).save(picture)
    segments = generate.main(["How many objects are there?", "--image", str(picture), "--output-dir", str(tmp_path)])
    assert segments == ["2"]
    assert not list(tmp_path.glob("image_*.png"))


def test_world_question_without_image_is_answered_in_text(tmp_path):
    segments = generate.main(["Which is bigger, a small diamond or a large diamond?", "--output-dir", str(tmp_path)])
    assert segments == ["a large diamond"]


def test_missing_input_image_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["What is this?", "--image", str(tmp_path / "nope.png")])
    assert "nope.png: no such file" in capsys.readouterr().err
