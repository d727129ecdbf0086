"""Shape world, last step: the trained ARMOR checkpoint as the repository's default model, `armor-shapeworld/`.

    python scripts/shapeworld_export.py runs/shapeworld/wohg/stage3 [--output armor-shapeworld] [--overwrite]

Weights are stored in bfloat16 (half the bytes; `from_pretrained(..., dtype=torch.float32)` widens them exactly),
training leftovers (checkpoint-N/, optimizer state, training_args.bin) stay behind, and the code files become
relative symbolic links to the repository's own, so that git holds each line of code once while the folder still
loads with `AutoModel.from_pretrained("armor-shapeworld", trust_remote_code=True)`. Written into a temporary sibling
folder and renamed at the end.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from armor_package import CODE_FILES  # noqa: E402  (registers the package `armor`)

WEIGHT_FILE = "model.safetensors"
REQUIRED = ("config.json", "generation_config.json", "chat_template.jinja", "preprocessor_config.json",
            "processor_config.json", "tokenizer")  # fmt: skip
COPIED = (*REQUIRED, "README.md")  # a model card, where the checkpoint has one


def bfloat16_weights(source: Path, target: Path) -> int:
    """One model.safetensors in bfloat16 from a checkpoint's single or sharded weights; returns the tensor count."""
    index = source / f"{WEIGHT_FILE}.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHT_FILE]
    tensors = {}
    for shard in shards:
        for name, tensor in load_file(source / shard).items():
            tensors[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    save_file(tensors, target / WEIGHT_FILE, metadata={"format": "pt"})
    return len(tensors)


def export(checkpoint: Path, output: Path) -> Path:
    config_path = checkpoint / "config.json"
    if not config_path.is_file() or json.loads(config_path.read_text()).get("model_type") != "armor":
        raise ValueError(f"{checkpoint} is not an ARMOR checkpoint folder (no config.json with model_type 'armor').")
    for name in REQUIRED:
        if not (checkpoint / name).exists():
            raise FileNotFoundError(f"{checkpoint} lacks {name}; export a complete train_wohg.py output folder.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    staging.chmod(0o755)
    try:
        count = bfloat16_weights(checkpoint, staging)
        (staging / "vqgan").mkdir()
        shutil.copy2(checkpoint / "vqgan" / "config.json", staging / "vqgan" / "config.json")
        bfloat16_weights(checkpoint / "vqgan", staging / "vqgan")
        for name in COPIED:
            source = checkpoint / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.is_file():
                shutil.copy2(source, staging / name)
        for config_file in (staging / "config.json", staging / "vqgan" / "config.json"):
            config = json.loads(config_file.read_text())
            config["dtype"] = "bfloat16"
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in CODE_FILES:
            os.symlink(os.path.relpath(REPO_ROOT / name, output.resolve()), staging / name)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {output}: {count} tensors in bfloat16, code files linked to {REPO_ROOT}")
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the trained ARMOR folder (train_wohg.py's stage-3 output)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "armor-shapeworld")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        parser.error(f"{args.output} exists and is not empty; pass --overwrite to replace it")
    return export(args.checkpoint, args.output)


if __name__ == "__main__":
    main()
