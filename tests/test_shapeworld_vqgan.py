"""scripts/shapeworld_vqgan.py (shape world, step 1): a CPU smoke run, resuming, the time budget, refused options."""

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from armor.convert_checkpoint import load_vqgan
from armor.modeling_vqgan import ArmorVQGANModel
from shapeworld.world import Scene, SceneObject, render, sample_scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import shapeworld_vqgan  # noqa: E402

# 64px images (a 4x4 code grid) keep the multi-run tests to a fraction of a second per step on CPU.
SMALL = ["--smoke", "--image-size", "64", "--eval-images", "2"]


def train(output_dir: Path, *options: str) -> dict:
    return shapeworld_vqgan.main(["--output-dir", str(output_dir), *options])


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "checkpoint" / "model.safetensors"))


def trainer_state(output_dir: Path) -> dict:
    return torch.load(output_dir / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("smoke")
    train(output_dir, "--smoke")
    return output_dir


def test_smoke_run_saves_a_vqgan_that_encodes_a_world_image_to_a_16x16_grid(smoke_run):
    model = ArmorVQGANModel.from_pretrained(smoke_run / "vqgan")
    image = render(sample_scene(random.Random(7), "test"))
    codes = model.encode(image)
    assert image.size == (256, 256)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.config.num_embeddings == 64
    decoded = model.decode(codes, output_type="pil")[0]
    assert decoded.size == (256, 256)
    # What convert_checkpoint.py --vqgan reads is the same model.
    converted, _ = load_vqgan(smoke_run / "vqgan")
    assert torch.equal(converted.encode(image), codes)


def test_smoke_summary_reports_psnr_code_usage_and_throughput(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["step"] == summary["steps"] == 2 and summary["finished"]
    assert summary["stopped_by"] == "steps"
    assert summary["images_seen"] == 4 and summary["images_per_second"] > 0
    for split in ("test", "heldout"):
        evaluation = summary["eval"][split]
        assert evaluation["images"] == 4 and evaluation["code_grid"] == [16, 16]
        assert 0 < evaluation["psnr_db"] < 100
        assert 1 <= evaluation["codes_used"] <= 64
        assert 0 <= evaluation["checker_pass"] <= 1
        assert 1 <= evaluation["background_code_perplexity"] <= evaluation["codes_used"]
        assert 1 <= evaluation["code_perplexity"] <= evaluation["codes_used"]
    assert summary["vqgan_config"]["num_embeddings"] == 64
    assert (smoke_run / "reconstructions.png").is_file()
    assert [json.loads(line)["step"] for line in (smoke_run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_rerunning_a_finished_run_skips_training(smoke_run):
    saved = (smoke_run / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    summary = train(smoke_run, "--smoke")
    assert summary["skipped"] and summary["step"] == 2
    assert (smoke_run / "checkpoint" / "model.safetensors").stat().st_mtime_ns == saved


def test_resumed_run_reaches_the_weights_of_an_uninterrupted_run(tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    first = train(resumed, *SMALL, "--steps", "4", "--stop-at", "2")
    assert first["step"] == 2 and not first["finished"] and first["stopped_by"] == "stop_at"
    assert trainer_state(resumed)["step"] == 2
    second = train(resumed, *SMALL, "--steps", "4")
    assert second["step"] == 4 and second["finished"] and second["images_seen"] == 8
    train(straight, *SMALL, "--steps", "4")

    expected, actual = weights(straight), weights(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    expected_state, actual_state = trainer_state(straight), trainer_state(resumed)
    assert actual_state["step"] == 4
    assert torch.equal(actual_state["code_usage"], expected_state["code_usage"])
    assert actual_state["restarted_codes"] == expected_state["restarted_codes"]
    adam_steps = set()
    for index, moments in expected_state["optimizer"]["state"].items():
        resumed_moments = actual_state["optimizer"]["state"][index]
        assert float(resumed_moments["step"]) == float(moments["step"])
        assert torch.equal(resumed_moments["exp_avg"], moments["exp_avg"])
        assert torch.equal(resumed_moments["exp_avg_sq"], moments["exp_avg_sq"])
        adam_steps.add(float(moments["step"]))
    assert adam_steps == {4.0, 3.0}  # the codebook gets no gradient in the one autoencoder warm-up step
    assert [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_time_budget_stops_cleanly_and_a_rerun_continues(tmp_path):
    stopped = train(tmp_path, *SMALL, "--steps", "3", "--time-budget-s", "1e-6")
    assert stopped["step"] == 1 and stopped["stopped_by"] == "time_budget" and not stopped["finished"]
    assert ArmorVQGANModel.from_pretrained(tmp_path / "vqgan").config.num_embeddings == 64
    finished = train(tmp_path, *SMALL, "--steps", "3")
    assert finished["step"] == 3 and finished["finished"] and finished["images_seen"] == 6


def test_resuming_with_other_model_settings_is_refused(tmp_path):
    train(tmp_path, *SMALL, "--steps", "2", "--stop-at", "1")
    with pytest.raises(SystemExit, match="--codebook-size 64 \\(now 32\\)"):
        train(tmp_path, *SMALL, "--steps", "2", "--codebook-size", "32")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--image-size", "100"], "--image-size must be a multiple of 16"),
        (["--base-channels", "48"], "--base-channels must be a multiple of 32"),
        (["--crop-size", "24"], "--crop-size must be a multiple of 16"),
        (["--steps", "4", "--stop-at", "5"], "--stop-at must be between 1 and --steps"),
        (["--channel-multiplier", "1,two"], "--channel-multiplier must be comma-separated integers"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_options_are_refused_with_the_fix(tmp_path, options, message):
    with pytest.raises(SystemExit, match=message):
        train(tmp_path, "--smoke", *options)
    assert not (tmp_path / "checkpoint").exists()


def test_codes_are_placed_on_object_cells_only():
    # One large square whose 64 px box spans x, y in [100, 164): latent cells 6..10 of the 16x16 grid, both ways.
    scene = Scene([SceneObject("square", "red", "large", 132, 132)])
    pixels = shapeworld_vqgan.to_pixels(shapeworld_vqgan.render_images([scene], 256), torch.device("cpu"))
    cells = shapeworld_vqgan.object_cells(pixels, grid=16)
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected[0, 6:11, 6:11] = True
    assert torch.equal(cells, expected)
    latents = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    picked = shapeworld_vqgan.object_latents(latents, pixels)
    assert picked.shape == (25, 2)
    assert torch.equal(picked, latents[0].permute(1, 2, 0)[expected[0]])
    # A blank batch has no object cells: every latent is a candidate.
    blank = torch.ones(1, 3, 256, 256)  # white, in [-1, 1]
    assert shapeworld_vqgan.object_latents(latents, blank).shape == (256, 2)


def test_code_perplexity_counts_the_codes_in_effective_use():
    assert shapeworld_vqgan.perplexity(torch.tensor([3, 3, 3, 3]), 8) == 1.0
    assert shapeworld_vqgan.perplexity(torch.tensor([[0, 1], [2, 3]]), 8) == 4.0
    assert shapeworld_vqgan.perplexity(torch.tensor([0, 0, 0, 1]), 8) == round(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), 1
    )
