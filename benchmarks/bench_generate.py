"""Time image decoding for an InternVL2.5-8B-shaped ARMOR model (random weights, bf16, batch 1).

Reports ms per image token and seconds per 1024-token image, with and without classifier-free guidance, for the
eager loop over a dynamic cache and for the static cache with the compiled decode step, next to the memory-bandwidth
limit: the bytes of weights one image token must read (LLM layers, adapter, visual head), divided by the bandwidth of a
device-to-device copy measured here.

    python benchmarks/bench_generate.py [--out results.json] [--modes eager static]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: F401,E402  (registers the package `armor`)

# isort: split
from armor.configuration_armor import ArmorConfig  # noqa: E402
from armor.modeling_armor import ArmorForConditionalGeneration  # noqa: E402

INTERNVL2_5_8B = {
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 448,
        "patch_size": 14,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 92553,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
    },
    "image_token_id": 92546,
    "image_start_token_id": 92544,
    "image_end_token_id": 92545,
    "num_adapter_layers": 4,
}


def build_model(device: str) -> ArmorForConditionalGeneration:
    config = ArmorConfig(**INTERNVL2_5_8B)
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = ArmorForConditionalGeneration(config)
        torch.set_default_dtype(torch.float32)
    return model.eval()


def bytes_per_image_token(model: ArmorForConditionalGeneration) -> int:
    """Weights read by one image-mode step: LLM layers + norm, adapter, visual head (embeddings: one row, ignored)."""
    parts = [model.model.language_model.layers, model.model.language_model.norm, model.adapter, model.visual_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 10 / (time.perf_counter() - start)


def time_image(model, prompt, cache: str, guidance: float | None) -> tuple[float, float]:
    """Seconds for the prefill alone, and for prefill + one whole image (codes + <imgend>)."""
    settings = {"cache_implementation": cache, "guidance_scale": guidance, "image_top_k": 2000}
    num_codes = model.config.num_image_codes

    def timed(function) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = 2 if guidance else 1
    with torch.no_grad():
        prefill = min(timed(lambda: model(prompt.expand(rows, -1), logits_to_keep=1)) for _ in range(3))
    timed(lambda: model.generate(prompt, max_new_tokens=num_codes + 1, seed=0, **settings))  # warm-up / compile
    whole = timed(lambda: model.generate(prompt, max_new_tokens=num_codes + 1, seed=0, **settings))
    return prefill, whole


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_generate.json"))
    parser.add_argument("--modes", nargs="+", default=["eager", "static"], choices=["eager", "static"])
    parser.add_argument("--prompt-length", type=int, default=64)
    args = parser.parse_args()
    device = "cuda"
    model = build_model(device)
    config = model.config
    prompt = torch.randint(0, 90000, (1, args.prompt_length), device=device)
    prompt[0, -1] = config.imgbos_token_id  # start in image mode: every step below is an image token
    weight_bytes = bytes_per_image_token(model)
    bandwidth = copy_bandwidth(device)
    limit_ms = weight_bytes / bandwidth * 1e3
    rows = []
    for mode in args.modes:
        cache = "dynamic" if mode == "eager" else "static"
        for guidance in (None, 3.0):
            prefill, whole = time_image(model, prompt, cache, guidance)
            per_token_ms = (whole - prefill) / config.num_image_codes * 1e3
            rows.append(
                {
                    "decode": "eager loop, dynamic cache" if mode == "eager" else "static cache + torch.compile",
                    "guidance": "off" if guidance is None else f"scale {guidance} (batch 2)",
                    "ms_per_image_token": round(per_token_ms, 2),
                    "s_per_image": round(whole, 2),
                    "x_bandwidth_limit": round(per_token_ms / limit_ms, 2),
                }
            )
            print(rows[-1], flush=True)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shapes": "InternVL2.5-8B (InternLM2.5-7B in Llama layout) + 4 adapter layers, bf16, batch 1",
        "image_tokens": config.num_image_codes,
        "weight_bytes_per_image_token": weight_bytes,
        "copy_bandwidth_TBps": round(bandwidth / 1e12, 2),
        "bandwidth_limit_ms_per_token": round(limit_ms, 2),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['gpu']}, torch {result['torch']}; {result['shapes']}")
    gigabytes, terabytes_per_s = weight_bytes / 1e9, bandwidth / 1e12
    print(f"bandwidth limit: {gigabytes:.2f} GB per image token / {terabytes_per_s:.2f} TB/s = {limit_ms:.2f} ms")
    print(f"| decode | guidance | ms / image token | s / image ({config.num_image_codes} tokens) | x limit |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['decode']} | {row['guidance']} | {row['ms_per_image_token']} | {row['s_per_image']} "
            f"| {row['x_bandwidth_limit']} |"
        )


if __name__ == "__main__":
    main()
