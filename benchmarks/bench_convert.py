#!/usr/bin/env python
"""Benchmark convert_checkpoint.py at InternVL2.5-8B's exact shapes: wall time and peak memory.

Builds a synthetic release-format checkpoint (InternViT-300M + InternLM2.5-7B: hidden 4096, 32 layers, 32 heads,
8 KV heads, FFN 14336, vocab 92553; random bfloat16 values; 4 shards + index, as released) and a VQGAN folder with
Chameleon's real shapes (8192 codes), then converts them. Each phase runs in its own process, which reports its wall
time and peak RSS (`resource.getrusage`), so the numbers are the converter's alone.

    python benchmarks/bench_convert.py                      # the 8B shapes (15 GiB source + 17 GiB output)
    python benchmarks/bench_convert.py --llm-layers 8 32    # same widths, two depths: peak RSS must not grow

Needs about twice the checkpoint size free on --workdir's disk; everything is deleted afterwards unless --keep.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "internvl2_5-tiny-internlm2"

VISION = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
LLM = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 92553,
}
SPM_PIECES = 92544  # InternLM2.5's sentencepiece vocabulary; InternVL's 9 added tokens follow it


def import_converter():
    sys.path.insert(0, str(REPO_ROOT))
    import armor_package  # noqa: F401  (registers the package `armor`)
    from armor import convert_checkpoint

    return convert_checkpoint


def release_config(llm_layers: int) -> dict:
    """config.json as InternVL2_5-8B's (only the fields a loader reads, plus the identifying ones)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": 448,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": {
            **VISION,
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "image_size": 448,
            "patch_size": 14,
            "num_channels": 3,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
        },
        "llm_config": {
            **LLM,
            "num_hidden_layers": llm_layers,
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "bias": False,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "tie_word_embeddings": False,
        },
    }


def release_tensors(llm_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the release layout, in the order InternVL's shards hold them (LLM, projector, ViT)."""
    width, hidden, ffn, vocab = VISION["hidden_size"], LLM["hidden_size"], LLM["intermediate_size"], LLM["vocab_size"]
    head_dim = hidden // LLM["num_attention_heads"]
    qkv_rows = (LLM["num_attention_heads"] + 2 * LLM["num_key_value_heads"]) * head_dim
    tensors = [("language_model.model.tok_embeddings.weight", (vocab, hidden))]
    for i in range(llm_layers):
        prefix = f"language_model.model.layers.{i}."
        tensors += [
            (prefix + "attention.wqkv.weight", (qkv_rows, hidden)),
            (prefix + "attention.wo.weight", (hidden, hidden)),
            (prefix + "feed_forward.w1.weight", (ffn, hidden)),
            (prefix + "feed_forward.w3.weight", (ffn, hidden)),
            (prefix + "feed_forward.w2.weight", (hidden, ffn)),
            (prefix + "attention_norm.weight", (hidden,)),
            (prefix + "ffn_norm.weight", (hidden,)),
        ]
    tensors += [("language_model.model.norm.weight", (hidden,)), ("language_model.output.weight", (vocab, hidden))]
    tensors += [
        ("mlp1.0.weight", (4 * width,)),
        ("mlp1.0.bias", (4 * width,)),
        ("mlp1.1.weight", (hidden, 4 * width)),
        ("mlp1.1.bias", (hidden,)),
        ("mlp1.3.weight", (hidden, hidden)),
        ("mlp1.3.bias", (hidden,)),
    ]
    tensors += [
        ("vision_model.embeddings.class_embedding", (1, 1, width)),
        ("vision_model.embeddings.position_embedding", (1, 1025, width)),
        ("vision_model.embeddings.patch_embedding.weight", (width, 3, 14, 14)),
        ("vision_model.embeddings.patch_embedding.bias", (width,)),
    ]
    for i in range(VISION["num_hidden_layers"]):
        prefix = f"vision_model.encoder.layers.{i}."
        tensors += [
            (prefix + "attn.qkv.weight", (3 * width, width)),
            (prefix + "attn.qkv.bias", (3 * width,)),
            (prefix + "attn.proj.weight", (width, width)),
            (prefix + "attn.proj.bias", (width,)),
            (prefix + "mlp.fc1.weight", (VISION["intermediate_size"], width)),
            (prefix + "mlp.fc1.bias", (VISION["intermediate_size"],)),
            (prefix + "mlp.fc2.weight", (width, VISION["intermediate_size"])),
            (prefix + "mlp.fc2.bias", (width,)),
            (prefix + "norm1.weight", (width,)),
            (prefix + "norm1.bias", (width,)),
            (prefix + "norm2.weight", (width,)),
            (prefix + "norm2.bias", (width,)),
            (prefix + "ls1", (width,)),
            (prefix + "ls2", (width,)),
        ]
    return tensors


def write_tokenizer(folder: Path):
    """InternLM2.5's tokenizer layout at full size: the tiny fixture's sentencepiece model padded with filler pieces
    to 92544 (before its spare pieces, which the chat tokens overlay), so the added tokens land at 92538-92552."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((TINY_TOKENIZER / "tokenizer.model").read_bytes())
    pieces = list(proto.pieces)
    first_spare = next(i for i, piece in enumerate(pieces) if piece.piece.startswith("[UNUSED_TOKEN_"))
    shift = SPM_PIECES - len(pieces)
    filler = []
    for i in range(shift):
        piece = sentencepiece_model_pb2.ModelProto.SentencePiece()
        piece.piece, piece.score, piece.type = f"▁filler{i}", -1e4 - i, 1
        filler.append(piece)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:first_spare] + filler + pieces[first_spare:])
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())

    def moved(token_id: int) -> int:
        return token_id + shift if token_id >= first_spare else token_id

    config = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(moved(int(token_id))): token for token_id, token in config["added_tokens_decoder"].items()
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    added = json.loads((TINY_TOKENIZER / "added_tokens.json").read_text())
    (folder / "added_tokens.json").write_text(json.dumps({token: moved(i) for token, i in added.items()}))
    shutil.copy2(TINY_TOKENIZER / "special_tokens_map.json", folder / "special_tokens_map.json")


def generate(workdir: Path, llm_layers: int):
    """Phase 1: the synthetic source checkpoint (streamed: one tensor in memory at a time) and the VQGAN folder."""
    import torch

    cc = import_converter()
    from armor.configuration_armor import ArmorVQGANConfig
    from armor.modeling_vqgan import ArmorVQGANModel

    source = workdir / "internvl"
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps(release_config(llm_layers), indent=2))
    (source / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    write_tokenizer(source)
    specs = [cc.TensorSpec(name, shape, torch.bfloat16) for name, shape in release_tensors(llm_layers)]
    # A pool of random values, read at random offsets: random-looking data without paying for 8 G normal draws.
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(2**26, generator=generator).to(torch.bfloat16)
    writer = cc.StreamingSafetensorsWriter(source, specs, cc.parse_size("4.5GB"))
    for spec in specs:
        count = spec.nbytes // 2
        offset = int(torch.randint(0, pool.numel(), (1,), generator=generator))
        repeats = (offset + count) // pool.numel() + 1
        values = pool.repeat(repeats)[offset : offset + count] if repeats > 1 else pool[offset : offset + count]
        writer.write(spec.name, values.reshape(spec.shape))
        del values
    writer.close()
    torch.manual_seed(0)
    ArmorVQGANModel(ArmorVQGANConfig()).save_pretrained(workdir / "vqgan")  # Chameleon's release shapes


def convert(workdir: Path, output: Path, adapter_init: str):
    """Phase 2: the conversion itself, as the command line runs it."""
    cc = import_converter()
    cc.convert(
        str(workdir / "internvl"), str(workdir / "vqgan"), output, adapter_init=adapter_init, log=lambda _: None
    )


def run_phase(phase: str, *args: str) -> dict:
    """Run one phase in a fresh process; it prints its wall time and peak RSS as the last line."""
    command = [sys.executable, __file__, "--phase", phase, *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-layers", type=int, nargs="+", default=[32], help="LLM depths to run (default: 32).")
    parser.add_argument("--adapter-init", choices=("random", "copy-top"), default="random")
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a new one in /tmp).")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic source and the output.")
    parser.add_argument("--phase", choices=("generate", "convert"), help=argparse.SUPPRESS)
    parser.add_argument("--args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # inside a child process
        started = time.perf_counter()
        workdir = Path(args.args[0])
        if args.phase == "generate":
            generate(workdir, int(args.args[1]))
        else:
            convert(workdir, Path(args.args[1]), args.args[2])
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"wall_s": time.perf_counter() - started, "peak_rss_gib": peak_kib / 2**20}))
        return

    base = args.workdir or Path(tempfile.mkdtemp(prefix="armor-bench-"))
    rows = []
    try:
        for layers in args.llm_layers:
            workdir = base / f"llm{layers}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            generated = run_phase("generate", "--args", str(workdir), str(layers))
            output = workdir / "armor"
            converted = run_phase("convert", "--args", str(workdir), str(output), args.adapter_init)
            source_gib = folder_bytes(workdir / "internvl") / 2**30
            output_gib = folder_bytes(output) / 2**30
            rows.append((layers, "write synthetic source", source_gib, generated))
            rows.append((layers, f"convert (adapter {args.adapter_init})", output_gib, converted))
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)

    print(f"InternVL2.5-8B shapes (InternViT-300M + InternLM2.5-7B, bfloat16), Python {sys.version.split()[0]}")
    print("| LLM layers | phase | data written (GiB) | wall time (s) | peak RSS (GiB) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for layers, phase, size, numbers in rows:
        print(f"| {layers} | {phase} | {size:.2f} | {numbers['wall_s']:.1f} | {numbers['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
