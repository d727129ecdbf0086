"""Shape world, step 4a: the WoHG training data, one folder per kind (t2t, ti2t, t2i, t2ti, ti2ti).

    python scripts/shapeworld_data.py [--output-dir runs/shapeworld/data] [--t2i 36000 ...] [--parts 16]

Each kind's folder holds `part-NN.jsonl` files (written in parallel, one seed each) and their PNGs under `images/`, in
the paper's record layout that `wohg_data.py` reads; `configs/shapeworld_wohg.yaml` names the folders each stage trains
on. Records come from the "train" split only: the held-out colour-shape combinations never appear. A folder written
with the same options is reused (the run is resumable); one written with other options is an error, not a silent mix.

Next: `python wohg_data.py tokenize --data runs/shapeworld/data/t2i ... --model runs/shapeworld/armor` encodes the
target images once, then `train_wohg.py --stage all --config configs/shapeworld_wohg.yaml` trains.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: F401,E402  (registers the package `armor`)

# isort: split
from shapeworld.data import KINDS, run_jobs, split_counts, write_dataset  # noqa: E402

MARKER = "shapeworld_data.json"
DEFAULT_COUNTS = {"ti2t": 8_000, "t2t": 4_000, "t2i": 36_000, "t2ti": 8_000, "ti2ti": 4_000}


def write_data(output_dir: Path, counts: dict[str, int], parts: int, seed: int, workers: int) -> dict:
    """Write every kind's parts in parallel, unless a complete copy with the same options is there."""
    settings = {"counts": counts, "parts": parts, "seed": seed}
    marker = output_dir / MARKER
    if marker.is_file():
        written = json.loads(marker.read_text())
        if written != settings:
            raise ValueError(
                f"{output_dir} holds data written with other options ({written}, now {settings}). Pass the same "
                "options, another --output-dir, or delete the folder to write it again."
            )
        print(f"data: reusing {output_dir} ({sum(counts.values())} records)")
        return settings

    started = time.perf_counter()
    for kind in KINDS:  # what an interrupted earlier run left
        shutil.rmtree(output_dir / kind, ignore_errors=True)
    jobs = [
        (write_dataset, (output_dir / kind, {kind: count}, "train", seed * 1000 + index, 256, f"part-{index:02d}"))
        for kind in KINDS
        for index, count in enumerate(split_counts(counts[kind], parts))
        if count
    ]
    run_jobs(jobs, workers)
    marker.write_text(json.dumps(settings, indent=2) + "\n")
    print(f"data: wrote {sum(counts.values())} records into {output_dir} in {time.perf_counter() - started:.1f} s")
    return settings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/shapeworld/data"))
    for kind in KINDS:
        parser.add_argument(f"--{kind}", type=int, default=DEFAULT_COUNTS[kind], help=f"{kind} records")
    parser.add_argument("--parts", type=int, default=16, help="files per kind, written in parallel")
    parser.add_argument("--seed", type=int, default=1, help="part k of a kind uses seed 1000 x seed + k")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    counts = {kind: getattr(args, kind) for kind in KINDS}
    for kind, count in counts.items():
        if count < 0:
            parser.error(f"--{kind} must be >= 0, got {count}")
    if args.parts < 1:
        parser.error(f"--parts must be >= 1, got {args.parts}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return write_data(args.output_dir, counts, args.parts, args.seed, args.workers)


if __name__ == "__main__":
    main()
