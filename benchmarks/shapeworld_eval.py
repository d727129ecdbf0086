"""Evaluate the shape-world models: understanding, modality decision, drawing correctness, speed. One table.

    python benchmarks/shapeworld_eval.py --base runs/shapeworld/base \
        --stages runs/shapeworld/wohg/stage1 runs/shapeworld/wohg/stage2 runs/shapeworld/wohg/stage3 [--count 100]
    python benchmarks/shapeworld_eval.py --stages armor-shapeworld --speed-only --device cpu   # images/s alone

(a) Understanding: exact-match accuracy on held-out scenes (split "test": ti2t questions about an input image, t2t
    questions about the world), greedy, text answers (`modality="text"`), for the base InternVL model (transformers'
    `InternVLForConditionalGeneration`) and for each ARMOR stage. Also the share of answers identical to the base's.
(b) Modality decision: prompts of each kind (split "test"), `modality="auto"`: is the answer text-only, image-only or
    text+image, as its kind asks (ti2t, t2t: text; t2i: image; t2ti, ti2ti: text+image)?
(c) Drawing correctness: t2i prompts (`modality="image"`), scored by `shapeworld.checker.score` (objects, counts,
    colours, sizes, positions, relations, nothing extra), separately for seen combinations (split "test") and
    held-out colour-shape combinations (split "heldout").
(d) Speed: images per second of (c) on this device.

Writes shapeworld_eval.json, shapeworld_eval.md (the table) and shapeworld_grid.png (drawings next to their prompts)
into --out ($OUT or .), and prints the table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: F401,E402  (registers the package `armor`)

# isort: split
from shapeworld.checker import score  # noqa: E402
from shapeworld.data import Example, make_examples  # noqa: E402
from shapeworld.world import render  # noqa: E402

EVAL_SEED = 1234  # examples are drawn from the test/heldout splits with their own seed
CHECKS = ("objects_present", "counts", "colours", "sizes", "positions", "relations", "no_extra", "pass")
UNDERSTANDING_TOKENS = 64


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


class Evaluator:
    """Runs prompts through the models in batches; the processor of the first ARMOR stage builds every prompt."""

    def __init__(self, processor, device: str, batch_size: int):
        self.processor = processor
        self.device = device
        self.batch_size = batch_size

    def prompt(self, example: Example) -> tuple[str, list[Image.Image]]:
        images = [render(s) for s, role in zip(example.scenes, example.image_roles) if role == "input"]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": example.prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return text, images

    def batches(self, examples: list[Example]):
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            prompts = [self.prompt(example) for example in chunk]
            images = [images for _, images in prompts]
            inputs = self.processor(text=[text for text, _ in prompts], images=images if any(images) else None)
            yield chunk, inputs.to(self.device)

    def answer_texts(self, model, examples: list[Example], armor: bool) -> list[str]:
        """Greedy text answers (the base model through transformers' generate, ARMOR with modality="text")."""
        answers = []
        for _, inputs in self.batches(examples):
            with torch.no_grad():
                if armor:
                    output = model.generate(**inputs, modality="text", max_new_tokens=UNDERSTANDING_TOKENS)
                else:
                    output = model.generate(
                        input_ids=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"],
                        pixel_values=inputs.get("pixel_values"),
                        max_new_tokens=UNDERSTANDING_TOKENS,
                        do_sample=False,
                        eos_token_id=self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                        pad_token_id=self.processor.tokenizer.pad_token_id,
                    )
            new = output[:, inputs["input_ids"].shape[1] :]
            answers += [self.processor.tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return answers

    def answers(self, model, examples: list[Example], **settings) -> list[list]:
        """ARMOR answers as segments (text and PIL images), seeded."""
        answers = []
        for _, inputs in self.batches(examples):
            output = model.generate(**inputs, seed=0, **settings)
            answers += self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])
        return answers


def answer_modality(segments: list) -> str:
    has_text = any(isinstance(s, str) and s.strip() for s in segments)
    has_image = any(isinstance(s, Image.Image) for s in segments)
    return {(True, False): "text", (False, True): "image", (True, True): "text+image"}.get(
        (has_text, has_image), "none"
    )


def understanding(evaluator: Evaluator, model, examples: list[Example], armor: bool) -> tuple[dict, list[str]]:
    answers = evaluator.answer_texts(model, examples, armor)
    result = {}
    for kind in ("ti2t", "t2t"):
        pairs = [(e, a) for e, a in zip(examples, answers) if e.kind == kind]
        result[kind] = sum(normalise(a) == normalise(e.answer) for e, a in pairs) / max(len(pairs), 1)
    return result, answers


def drawing(evaluator: Evaluator, model, examples: list[Example], **settings) -> tuple[dict, list, float]:
    """Checker rates, (example, image, score) triples and images/s of one drawing per prompt; `settings` override
    the checkpoint's generation config."""
    start = time.perf_counter()
    answers = evaluator.answers(model, examples, modality="image", **settings)
    if evaluator.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = [next(s for s in segments if isinstance(s, Image.Image)) for segments in answers]
    scores = [score(example.spec, image) for example, image in zip(examples, images)]
    rates = {check: sum(s[check] for s in scores) / len(scores) for check in CHECKS}
    return rates, list(zip(examples, images, scores)), len(images) / seconds


def grid(samples: list, path: Path, columns: int = 4, cell: int = 256) -> None:
    """Drawings in a grid, each above its prompt and its checker verdict."""
    caption = 44
    rows = (len(samples) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (example, image, result) in enumerate(samples):
        x, y = (index % columns) * cell, (index // columns) * (cell + caption)
        canvas.paste(image.resize((cell, cell)), (x, y))
        words, lines = example.prompt.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) + 1 > 40:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        verdict = ("PASS" if result["pass"] else "fail") + f" ({example.split})"
        draw.multiline_text((x + 4, y + cell + 2), "\n".join(lines[:2] + [verdict]), fill="black")
    canvas.save(path)


def load_armor(path: str, device: str):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    processor.vqgan = model.vqgan
    return model, processor


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="the base InternVL model (transformers-native folder)")
    parser.add_argument("--stages", nargs="+", required=True, help="ARMOR checkpoints, e.g. after stages 1, 2, 3")
    parser.add_argument("--count", type=int, default=100, help="examples per kind and split")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--speed-only", action="store_true", help="only (d), on the last stage")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"

    if args.speed_only:
        model, processor = load_armor(args.stages[-1], args.device)
        evaluator = Evaluator(processor, args.device, args.batch_size)
        examples = make_examples("t2i", args.count, "test", EVAL_SEED)
        _, _, images_per_s = drawing(evaluator, model, examples)
        result = {
            "device": device_name,
            "images": args.count,
            "batch_size": args.batch_size,
            "images_per_s": images_per_s,
        }
        print("| device | images | batch | images/s |\n| --- | --- | --- | --- |")
        print(f"| {device_name} | {args.count} | {args.batch_size} | {images_per_s:.2f} |")
        (args.out / "shapeworld_speed.json").write_text(json.dumps(result, indent=2))
        return result

    questions = make_examples("ti2t", args.count, "test", EVAL_SEED) + make_examples(
        "t2t", args.count, "test", EVAL_SEED
    )
    decisions = [
        e
        for kind in ("ti2t", "t2t", "t2i", "t2ti", "ti2ti")
        for e in make_examples(kind, args.count, "test", EVAL_SEED)
    ]
    drawings = {split: make_examples("t2i", args.count, split, EVAL_SEED) for split in ("test", "heldout")}

    rows, base_answers, samples = [], None, []
    _, processor = load_armor(args.stages[0], "cpu")
    evaluator = Evaluator(processor, args.device, args.batch_size)
    if args.base:
        from transformers import InternVLForConditionalGeneration

        base = InternVLForConditionalGeneration.from_pretrained(args.base, dtype=torch.float32).to(args.device).eval()
        accuracy, base_answers = understanding(evaluator, base, questions, armor=False)
        rows.append({"model": "base InternVL", **{f"understanding_{k}": v for k, v in accuracy.items()}})
        del base
    for stage in args.stages:
        model, processor = load_armor(stage, args.device)
        evaluator.processor = processor
        row = {"model": Path(stage).name}
        accuracy, answers = understanding(evaluator, model, questions, armor=True)
        row.update({f"understanding_{k}": v for k, v in accuracy.items()})
        if base_answers is not None:
            row["same_answers_as_base"] = sum(a == b for a, b in zip(answers, base_answers)) / len(answers)
        segments = evaluator.answers(model, decisions, max_new_tokens=model.config.num_image_codes + 2 + 96)
        for kind in ("ti2t", "t2t", "t2i", "t2ti", "ti2ti"):
            pairs = [(e, s) for e, s in zip(decisions, segments) if e.kind == kind]
            row[f"decision_{kind}"] = sum(answer_modality(s) == e.modality for e, s in pairs) / len(pairs)
        row["decision_all"] = sum(answer_modality(s) == e.modality for e, s in zip(decisions, segments)) / len(
            decisions
        )
        for split, examples in drawings.items():
            rates, scored, images_per_s = drawing(evaluator, model, examples)
            name = "seen" if split == "test" else "heldout"
            row.update({f"draw_{name}_{check}": rate for check, rate in rates.items()})
            row[f"images_per_s_{name}"] = images_per_s
            if stage == args.stages[-1]:
                samples += scored[:8]
        rows.append(row)
        del model

    grid(samples, args.out / "shapeworld_grid.png")
    table = format_table(rows, device_name, args)
    result = {"device": device_name, "count_per_kind": args.count, "rows": rows}
    (args.out / "shapeworld_eval.json").write_text(json.dumps(result, indent=2))
    (args.out / "shapeworld_eval.md").write_text(table)
    print(table)
    return result


def format_table(rows: list[dict], device_name: str, args) -> str:
    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        return "—" if value is None else f"{value:.1%}" if "images_per_s" not in key else f"{value:.2f}"

    columns = [
        ("understanding ti2t", "understanding_ti2t"),
        ("understanding t2t", "understanding_t2t"),
        ("same answers as base", "same_answers_as_base"),
        ("decision (all kinds)", "decision_all"),
        ("decision t2i", "decision_t2i"),
        ("decision t2ti", "decision_t2ti"),
        ("decision ti2ti", "decision_ti2ti"),
        ("draw pass, seen", "draw_seen_pass"),
        ("draw pass, held-out", "draw_heldout_pass"),
        ("images/s", "images_per_s_seen"),
    ]
    lines = [
        f"shape world, {args.count} examples per kind and split, {device_name}",
        "",
        "| model | " + " | ".join(title for title, _ in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    lines += ["| " + row["model"] + " | " + " | ".join(cell(row, key) for _, key in columns) + " |" for row in rows]
    last = rows[-1]
    lines += [
        "",
        f"drawing checks of {last['model']} (seen / held-out):",
        "",
        "| check | seen | held-out |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {c} | {cell(last, f'draw_seen_{c}')} | {cell(last, f'draw_heldout_{c}')} |" for c in CHECKS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
