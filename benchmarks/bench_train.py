"""Time one WoHG stage-2 training step of an InternVL2.5-8B-shaped ARMOR model (random weights, bf16, one GPU).

Stage 2 trains the new embedding rows, the 4 adapter layers and the visual head (about 0.94B parameters) with the
image loss only; the LLM (InternLM2.5-7B shapes, in Llama layout) is frozen but the gradient flows through it to the
embedding rows. The model is built as train_wohg.py builds it without DeepSpeed: frozen weights in bf16, trainable
weights in float32 under bf16 autocast, AdamW (fused). Each row of a batch is a random text prompt followed by one
target image (<imgbos>, 1024 codes, <imgend>); the codes and <imgend> are the targets.

As many LLM layers as fit: a row starts at --llm-layers (32, the real model) and drops 4 layers at a time on
out-of-memory. Reported per row: step time, tokens/s, model FLOPs utilisation (MFU: the FLOPs the step needs, see
`step_flops`, over the step time and the GPU's dense bf16 peak; recomputation by gradient checkpointing is not
counted), peak memory. JSON goes to $OUT/bench_train.json (or --out).

    python benchmarks/bench_train.py [--batch-size 4] [--seq-len 2048] [--llm-layers 32] [--steps 5]
    python benchmarks/bench_train.py --smoke          # tiny shapes on CPU: checks the script, numbers meaningless
"""

import argparse
import gc
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
from armor.benchmarks.bench_generate import INTERNVL2_5_8B  # noqa: E402
from armor.configuration_armor import ArmorConfig  # noqa: E402
from armor.modeling_armor import ArmorForConditionalGeneration  # noqa: E402
from armor.train_wohg import STAGES, parameter_table, set_trainable  # noqa: E402

# Dense bf16 tensor-core peaks (SXM parts), FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}

TINY = {
    "text_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 120,
        "max_position_embeddings": 4096,
    },
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "vqgan_config": {
        "num_embeddings": 64,
        "embed_dim": 16,
        "latent_channels": 16,
        "base_channels": 32,
        "channel_multiplier": [1, 2],
        "num_res_blocks": 1,
        "resolution": 32,
    },
    "image_codebook_size": 64,
    "num_image_codes": 16,
    "num_adapter_layers": 2,
    "image_token_id": 100,
    "image_start_token_id": 101,
    "image_end_token_id": 102,
}


def meta_model_parameter_rows(stage: int, shapes: dict = INTERNVL2_5_8B) -> list[dict]:
    """Parameters and trainable parameters per part for a stage's preset, on a meta-device model (no memory)."""
    with torch.device("meta"):
        model = ArmorForConditionalGeneration(ArmorConfig(**shapes))
    set_trainable(model, STAGES[stage]["trainable"])
    return parameter_table(model)[0]


def build_model(shapes: dict, num_layers: int, device: str) -> ArmorForConditionalGeneration:
    """Random weights: frozen parts in bf16, stage-2 trainable parts in float32 (AdamW's master weights)."""
    values = json.loads(json.dumps(shapes))
    values["text_config"]["num_hidden_layers"] = num_layers
    config = ArmorConfig(**values)
    config.text_config._attn_implementation = "sdpa"
    config.text_loss_weight, config.image_loss_weight = 0.0, 1.0
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = ArmorForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    set_trainable(model, STAGES[2]["trainable"])
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model.train()


def make_batch(config: ArmorConfig, batch_size: int, seq_len: int, device: str) -> dict:
    """Rows of a random text prompt, then <imgbos> + codes + <imgend>; labels on the codes and <imgend>."""
    num_codes = config.num_image_codes
    prompt_length = seq_len - num_codes - 2
    if prompt_length < 1:
        raise ValueError(f"--seq-len must exceed {num_codes + 2} (one image); got {seq_len}.")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.image_token_id - 1, (batch_size, prompt_length), generator=generator)
    codes = torch.randint(0, config.image_codebook_size, (batch_size, num_codes), generator=generator)
    image = torch.cat(
        [
            torch.full((batch_size, 1), config.imgbos_token_id),
            codes + config.image_code_offset,
            torch.full((batch_size, 1), config.imgend_token_id),
        ],
        dim=1,
    )
    input_ids = torch.cat([prompt, image], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, prompt_length + 1 :] = input_ids[:, prompt_length + 1 :]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "use_cache": False,
    }


def step_flops(config: ArmorConfig, batch_size: int, seq_len: int) -> int:
    """
    FLOPs of one stage-2 step: forward of the LLM, adapter, both heads (the model computes both on every position);
    backward of the frozen LLM layers for input gradients only (1x forward), of the adapter and visual head with
    weight gradients (2x forward), none for the text head (text loss weight 0). Causal attention counts half of S^2.
    """
    text = config.text_config
    hidden, tokens = text.hidden_size, batch_size * seq_len
    head_dim = hidden // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    layer_weights = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * text.intermediate_size
    layer_matmul = 2 * layer_weights * tokens
    attention = 2 * batch_size * seq_len * seq_len * hidden  # QK^T and AV, causal half
    text_head = 2 * hidden * (text.vocab_size + 1) * tokens
    visual_head = 2 * hidden * (config.image_codebook_size + 2) * tokens
    llm, adapter = text.num_hidden_layers, config.num_adapter_layers
    forward = (llm + adapter) * (layer_matmul + attention) + text_head + visual_head
    backward = llm * (layer_matmul + 2 * attention) + adapter * 2 * (layer_matmul + attention) + 2 * visual_head
    return forward + backward


def time_steps(model, batch: dict, steps: int, device: str) -> tuple[float, float]:
    """Seconds per step (forward, backward, clip, AdamW) after 2 warm-up steps, and the loss of the last step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05, fused=device == "cuda")
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize()
    return (time.perf_counter() - start) / steps, float(loss)


def run_row(shapes: dict, args, checkpointing: bool, device: str) -> dict:
    """One configuration, with as many LLM layers as fit (4 fewer after each out-of-memory)."""
    layers = args.llm_layers
    while layers >= 1:
        model = batch = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model = build_model(shapes, layers, device)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            batch = make_batch(model.config, args.batch_size, args.seq_len, device)
            seconds, loss = time_steps(model, batch, args.steps, device)
        except torch.OutOfMemoryError:
            print(f"  {layers} LLM layers: out of memory", flush=True)
            layers -= 4 if layers > 4 else 1
            continue  # the references held by the traceback go when the except block ends; memory is freed above
        config = model.config
        flops = step_flops(config, args.batch_size, args.seq_len)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else None
        if peak is None and device == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {
            "gradient_checkpointing": checkpointing,
            "llm_layers": layers,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "trainable_parameters": trainable,
            "step_s": round(seconds, 4),
            "tokens_per_s": round(args.batch_size * args.seq_len / seconds, 1),
            "model_tflops_per_step": round(flops / 1e12, 2),
            "mfu": round(flops / seconds / peak, 4) if peak else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device == "cuda" else None,
            "loss": round(loss, 3),
        }
        del model, batch
        gc.collect()
        return row
    return {"gradient_checkpointing": checkpointing, "llm_layers": 0, "error": "out of memory even with 1 LLM layer"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (prompt + one 1024-code image)")
    parser.add_argument("--llm-layers", type=int, default=32, help="LLM layers to try first (InternLM2.5-7B has 32)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_train.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        shapes, device = TINY, "cpu"
        args.batch_size, args.seq_len, args.llm_layers, args.steps = 2, 40, 2, 1
    else:
        shapes, device = INTERNVL2_5_8B, "cuda"
        if not torch.cuda.is_available():
            raise SystemExit("bench_train.py needs a CUDA GPU; use --smoke to check it on CPU.")

    rows = []
    for mode in args.checkpointing:
        rows.append(run_row(shapes, args, mode == "on", device))
        print(rows[-1], flush=True)
    stage_rows = meta_model_parameter_rows(2, shapes)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "shapes": "InternVL2.5-8B (InternLM2.5-7B in Llama layout, InternViT-300M) + 4 adapter layers"
        if not args.smoke
        else "tiny (smoke)",
        "stage": "2: image loss; new embedding rows + adapter + visual head trained; frozen bf16, trainable fp32",
        "trainable_parameters_full_model": sum(row["trainable"] for row in stage_rows),
        "flops_definition": step_flops.__doc__.strip().replace("\n    ", " "),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"\n{result['device']}, torch {result['torch']}; {result['shapes']}; stage 2")
    print(
        "| grad. checkpointing | LLM layers | batch x seq | step (s) | tokens/s | TFLOPs/step | MFU | peak mem (GB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {'on' if row['gradient_checkpointing'] else 'off'} | - | - | {row['error']} | | | | |")
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(
            f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['llm_layers']} | "
            f"{row['batch_size']} x {row['seq_len']} | {row['step_s']} | {row['tokens_per_s']:,} | "
            f"{row['model_tflops_per_step']} | {mfu} | {row['peak_memory_gb']} |"
        )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
