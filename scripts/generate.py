"""Answer one prompt with an ARMOR checkpoint: the answer's text is printed and each drawn image saved as a PNG.

    python scripts/generate.py "Draw a red circle to the left of a blue square." [--model PATH_OR_REPO]
        [--image photo.png] [--modality auto|text|image] [--seed 0] [--guidance-scale G] [--max-new-tokens N]
        [--output-dir outputs]

Without --model it runs `armor-shapeworld/`, the ARMOR model that ships with the repository: trained end to end in
the shape world (scripts/shapeworld.sh) from a small InternVL2.5-architecture base and a small Chameleon-architecture
VQGAN, so it answers questions about pictures of coloured shapes and draws 256px pictures of them. It loads as any
checkpoint does (AutoModel / AutoProcessor with trust_remote_code), on the GPU when there is one.
"""

import argparse
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "armor-shapeworld"


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the user's message")
    parser.add_argument(
        "--model", default=None, help="ARMOR checkpoint folder or Hub repo id (default: armor-shapeworld)"
    )
    parser.add_argument("--image", action="append", default=[], help="an input image (repeat for several)")
    parser.add_argument("--modality", choices=["auto", "text", "image"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    args = parser.parse_args(argv)
    for image in args.image:
        if not Path(image).is_file():
            parser.error(f"--image {image}: no such file")

    from transformers import AutoModel, AutoProcessor

    model_path = args.model or DEFAULT_MODEL
    if args.model is None and not (DEFAULT_MODEL / "config.json").is_file():
        parser.error(
            f"the default model {DEFAULT_MODEL} is missing; restore it with `git checkout -- {DEFAULT_MODEL}`"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    processor.vqgan = model.vqgan  # draw with the model's VQGAN instead of loading a second copy

    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=args.image or None).to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    settings = {"modality": args.modality, "seed": args.seed, "progress_bar": True}
    if args.guidance_scale is not None:
        settings["guidance_scale"] = args.guidance_scale
    if args.max_new_tokens is not None:
        settings["max_new_tokens"] = args.max_new_tokens
    if device == "cuda":
        settings["cache_implementation"] = "static"
    output = model.generate(**inputs, **settings)
    segments = processor.decode(output[0, inputs["input_ids"].shape[1] :])

    args.output_dir.mkdir(parents=True, exist_ok=True)
    image_number = 0
    for segment in segments:
        if isinstance(segment, str):
            print(segment)
        else:
            image_number += 1
            path = args.output_dir / f"image_{image_number}.png"
            segment.save(path)
            print(f"[image {image_number}: {segment.width}x{segment.height}, saved to {path}]")
    return segments


if __name__ == "__main__":
    main()
