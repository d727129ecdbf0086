"""A WoHG stage-2 run of the tiny ARMOR model for a few hundred steps, end to end, on one GPU.

1. convert the repo's tiny fixtures (InternVL2.5 tiny Qwen2 + tiny Chameleon VQGAN) into an ARMOR checkpoint;
2. write a toy dataset: drawn shapes ("a red circle on a blue background") as t2i, t2ti and ti2ti records;
3. encode the target images once (`wohg_data.py tokenize`, on the GPU);
4. train stage 2 (`train_wohg.py --stage 2`, bf16 on a GPU that supports it);
5. check: the image loss fell, the frozen weights are bitwise unchanged, the output folder loads with AutoModel and
   draws an image (saved as sample.png).

Everything lands in $OUT (or --out): summary.json (losses, steps/s, checks), loss.csv, sample.png, the logs.

    python scripts/tiny_stage2.py [--steps 300] [--records 256] [--batch-size 16] [--learning-rate 1e-3]
    python scripts/tiny_stage2.py --smoke      # CPU, a few steps: checks the script
"""

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: F401,E402  (registers the package `armor`)

# isort: split
from armor import convert_checkpoint, train_wohg, wohg_data  # noqa: E402

FIXTURES = REPO_ROOT / "tests" / "fixtures"
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: str, background: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), COLORS[background])
    pen = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[color])
    return image


def write_dataset(folder: Path, records: int, seed: int = 0) -> Path:
    """t2i, t2ti and ti2ti records over the drawn shapes; images relative to the JSONL file."""
    generator = torch.Generator().manual_seed(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names, lines = list(COLORS), []
    for index in range(records):
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=generator))]
        color, background = (names[int(i)] for i in torch.randperm(len(names), generator=generator)[:2])
        path = f"images/{shape}-{color}-on-{background}.png"
        if not (folder / path).exists():
            draw(shape, color, background).save(folder / path)
        caption = f"a {color} {shape} on a {background} background"
        kind = index % 3
        if kind == 0:
            turns = [{"from": "human", "value": f"Draw {caption}."}, {"from": "gpt", "value": "<image>"}]
            images = [path]
        elif kind == 1:
            turns = [{"from": "human", "value": f"Show me {caption}."}, {"from": "gpt", "value": "Here: <image>"}]
            images = [path]
        else:
            source = f"images/{shape}-{background}-on-{color}.png"
            if not (folder / source).exists():
                draw(shape, background, color).save(folder / source)
            turns = [
                {"from": "human", "value": "<image>\nSwap the two colours."},
                {"from": "gpt", "value": f"Now it is {caption}. <image>"},
            ]
            images = [source, path]
        lines.append(json.dumps({"id": index, "conversations": turns, "image": images}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def run(args, out: Path, work: Path) -> dict:
    """Convert, write the data, tokenize, train stage 2, check and draw; returns the summary."""

    checkpoint = convert_checkpoint.convert(
        str(FIXTURES / "internvl2_5-tiny-qwen2"),
        vqgan=str(FIXTURES / "chameleon-vqgan-tiny"),
        output=work / "armor-tiny",
        adapter_layers=2,
        image_size=args.image_size,
        log=print,
    )
    data = write_dataset(work / "data", args.records)
    started = time.perf_counter()
    wohg_data.main(["tokenize", "--data", str(data), "--model", str(checkpoint), "--num-workers", "2"])
    tokenize_s = time.perf_counter() - started

    output = work / "stage2"
    started = time.perf_counter()
    train_wohg.main(
        [
            "--stage", "2",
            "--model", str(checkpoint),
            "--data", str(data),
            "--output-dir", str(output),
            "--max-steps", str(args.steps),
            "--per-device-train-batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate),
            "--logging-steps", str(max(1, args.steps // 30)),
            "--save-steps", str(max(1, args.steps // 2)),
            "--dataloader-num-workers", "0" if args.smoke else "4",
        ]
    )  # fmt: skip
    train_s = time.perf_counter() - started

    summary = json.loads((output / train_wohg.SUMMARY_FILE).read_text())
    history = [entry for entry in summary["log_history"] if "image_loss" in entry]
    with open(out / "loss.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "loss", "image_loss", "text_loss", "learning_rate"])
        for entry in history:
            writer.writerow(
                [entry["step"], entry["loss"], entry["image_loss"], entry["text_loss"], entry["learning_rate"]]
            )

    from safetensors.torch import load_file
    from transformers import AutoModel

    before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(output / "model.safetensors"))
    trained = ("image_token_embeddings.", "adapter.", "visual_head.")
    frozen_equal = all(torch.equal(before[k], after[k]) for k in before if not k.startswith(trained))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(output, trust_remote_code=True).to(device)
    from armor.processing_armor import ArmorProcessor, build_internvl_prompt

    processor = ArmorProcessor.from_pretrained(output)
    prompt = processor(text=build_internvl_prompt("Draw a red circle on a blue background."))
    answer = model.generate(
        prompt["input_ids"].to(device),
        attention_mask=prompt["attention_mask"].to(device),
        modality="image",
        max_new_tokens=model.config.num_image_codes + 3,
        seed=0,
    )
    images = [
        part for part in processor.decode(answer[0, prompt["input_ids"].shape[1] :]) if not isinstance(part, str)
    ]
    images[0].resize((256, 256), Image.NEAREST).save(out / "sample.png")

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "steps": summary["global_step"],
        "records": summary["records"],
        "kinds": summary["kinds"],
        "batch_size": args.batch_size,
        "tokenize_s": round(tokenize_s, 2),
        "train_s": round(train_s, 2),
        "steps_per_s": round(summary["global_step"] / train_s, 2),
        "image_loss_first": history[0]["image_loss"],
        "image_loss_last": history[-1]["image_loss"],
        "image_loss_fell": history[-1]["image_loss"] < history[0]["image_loss"],
        "frozen_weights_bitwise_equal": frozen_equal,
        "parameters": {row["part"]: [row["parameters"], row["trainable"]] for row in summary["parameters"]},
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(f"\ntiny stage 2 on {result['device']} (summary.json, loss.csv, sample.png in {out})")
    print("| steps | batch | records | train (s) | steps/s | image loss first -> last | frozen weights unchanged |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {result['steps']} | {args.batch_size} | {result['records']} | {result['train_s']} | "
        f"{result['steps_per_s']} | {result['image_loss_first']:.3f} -> {result['image_loss_last']:.3f} | "
        f"{result['frozen_weights_bitwise_equal']} |"
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="the tiny random model learns slowly at 1e-4"
    )
    parser.add_argument("--image-size", type=int, default=64, help="generated image size (64: 4x4 = 16 codes)")
    parser.add_argument("--smoke", action="store_true", help="CPU, 6 steps, 12 records")
    parser.add_argument("--out", default=os.environ.get("OUT", "tiny_stage2_out"))
    parser.add_argument("--work", default=None, help="folder for checkpoints and data (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.records, args.batch_size = 6, 12, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tiny-stage2-"))
    try:
        return run(args, out, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
