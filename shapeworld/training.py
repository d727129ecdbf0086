"""What the shape-world training scripts share: the learning-rate schedule, bf16 autocast and resumable checkpoints."""

import argparse
import contextlib
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


class RunError(ValueError):
    """A bad option or an output folder that does not fit the command; the message says what to change."""


def add_schedule_arguments(parser: argparse.ArgumentParser, steps: int, time_budget_s: float):
    """--steps, --time-budget-s, --stop-at and the learning-rate schedule, which `check_schedule_args` checks."""
    parser.add_argument("--steps", type=int, default=steps, help="target number of optimizer steps")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=time_budget_s,
        help="stop training (saving) after this much training time",
    )
    parser.add_argument("--stop-at", type=int, default=None, help="stop this invocation at this step (resume later)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--min-learning-rate-ratio", type=float, default=0.05, help="cosine floor / peak")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--grad-clip", type=float, default=1.0)


def check_schedule_args(args: argparse.Namespace):
    """The options every shape-world trainer has: --time-budget-s, --stop-at, the learning-rate schedule."""
    if args.time_budget_s <= 0:
        raise RunError(f"--time-budget-s must be positive, got {args.time_budget_s}.")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise RunError(f"--stop-at must be between 1 and --steps ({args.steps}), got {args.stop_at}.")
    if not 0 < args.min_learning_rate_ratio <= 1 or args.learning_rate <= 0:
        raise RunError("--learning-rate must be positive and --min-learning-rate-ratio in (0, 1].")


def learning_rate_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then a cosine from the peak down to `min_learning_rate_ratio` x peak at --steps."""
    warmup = min(args.warmup_steps, args.steps // 10)
    if step < warmup:
        return args.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
    floor = args.min_learning_rate_ratio
    return args.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (or, with `enabled=False`, a float32 region inside one); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def save_checkpoint(output_dir: Path, model: torch.nn.Module, optimizer, state: dict):
    """Weights (safetensors) + optimizer and run state (torch), written beside and swapped in, never half-written."""
    final, staging, previous = (output_dir / f"{CHECKPOINT_DIR}{suffix}" for suffix in ("", ".tmp", ".old"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(staging / WEIGHTS_FILE))
    torch.save({**state, "optimizer": optimizer.state_dict()}, staging / STATE_FILE)
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def load_checkpoint(output_dir: Path, model: torch.nn.Module, optimizer, settings: dict) -> dict | None:
    """
    The saved state (model and optimizer loaded in place), or None for a fresh run. `settings` are this run's; the
    state's `settings` (and `data_settings`, where a script keeps them apart) must equal them, or resuming would mix
    two runs.
    """
    folder = output_dir / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file() and (output_dir / f"{CHECKPOINT_DIR}.old" / STATE_FILE).is_file():
        folder = output_dir / f"{CHECKPOINT_DIR}.old"  # interrupted between the two renames of `save_checkpoint`
    if not (folder / STATE_FILE).is_file():
        return None
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    saved = {**state["settings"], **state.get("data_settings", {})}
    differing = {name: (saved.get(name), value) for name, value in settings.items() if saved.get(name) != value}
    if differing:
        details = ", ".join(f"--{name.replace('_', '-')} {old} (now {new})" for name, (old, new) in differing.items())
        raise RunError(
            f"{folder} was trained with other settings: {details}. Rerun with the saved settings to resume, or pass "
            "another --output-dir to start a new run."
        )
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    return state
