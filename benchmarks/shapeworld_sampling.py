"""Choose the shape-world model's image-sampling defaults on prompts of the training distribution, never on the
evaluation's.

    python benchmarks/shapeworld_sampling.py --model armor-shapeworld [--count 64] [--device cpu]

Draws `--count` t2i prompts of the "train" split with their own seed (`VALIDATION_SEED`; some may also be training
records, none is one of the evaluation's "test" or "heldout" prompts) under every setting of a grid of
classifier-free guidance scales and image-token temperatures (top-k 8), plus the settings the H200 run was converted
with (guidance 3 and temperature 1, the converter's defaults, and top-k 32), each seeded as
`benchmarks/shapeworld_eval.py` seeds its drawings, and scores them with the checker. Prints one table (best pass
rate first) and writes shapeworld_sampling.json and shapeworld_sampling.md into --out ($OUT or .). The best setting
goes to the converter (`--guidance-scale`, `--image-temperature`, `--image-top-k` in `scripts/shapeworld.sh`), so that
the checkpoint's generation config carries it.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapeworld_eval import CHECKS, Evaluator, drawing, load_armor  # noqa: E402

from shapeworld.data import make_examples  # noqa: E402

VALIDATION_SEED = 777
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)
TEMPERATURES = (1.0, 0.7, 0.5)
TOP_K = 8
PREVIOUS_SETTINGS = {"guidance_scale": 3.0, "image_temperature": 1.0, "image_top_k": 32}


def settings_grid() -> list[dict]:
    grid = [
        {"guidance_scale": scale, "image_temperature": temperature, "image_top_k": TOP_K}
        for scale in GUIDANCE_SCALES
        for temperature in TEMPERATURES
    ]
    return [PREVIOUS_SETTINGS, *grid]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="armor-shapeworld", help="an ARMOR checkpoint of the shape world")
    parser.add_argument("--count", type=int, default=64, help="validation prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    if args.count < 1 or args.batch_size < 1:
        parser.error("--count and --batch-size must be at least 1.")
    args.out.mkdir(parents=True, exist_ok=True)

    model, processor = load_armor(args.model, args.device)
    evaluator = Evaluator(processor, args.device, args.batch_size)
    examples = make_examples("t2i", args.count, "train", VALIDATION_SEED)
    rows = []
    for settings in settings_grid():
        started = time.perf_counter()
        rates, _, _ = drawing(evaluator, model, examples, **settings)
        rows.append({**settings, **rates, "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)

    rows.sort(key=lambda row: -row["pass"])
    lines = [
        f"image-sampling settings of {args.model} on {args.count} validation t2i prompts (split train, seed "
        f"{VALIDATION_SEED}), best first",
        "",
        "| guidance | temperature | top-k | " + " | ".join(CHECKS) + " |",
        "| --- | --- | --- |" + " --- |" * len(CHECKS),
    ]
    for row in rows:
        rates = " | ".join(f"{row[check]:.1%}" for check in CHECKS)
        lines.append(f"| {row['guidance_scale']} | {row['image_temperature']} | {row['image_top_k']} | {rates} |")
    table = "\n".join(lines) + "\n"
    (args.out / "shapeworld_sampling.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "shapeworld_sampling.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
