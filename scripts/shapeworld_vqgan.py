"""Shape world, step 1: train a small VQGAN of Chameleon's architecture on world images.

The model is the repository's own `ArmorVQGANModel` (Chameleon's taming VQGAN: encoder, nearest-code quantizer,
decoder) with Chameleon's layout at a quarter of its width: channel multipliers 1,1,2,2,4 (5 levels, 16x
downsampling, so a 256px image is a 16x16 grid of 256 codes) on 32 base channels instead of 128, one res block per
level instead of two, 64 latent channels, 256 codes of 32 dimensions; 3.2M parameters (13 MB in float32).

    python scripts/shapeworld_vqgan.py --output-dir runs/shapeworld/vqgan      # one H100: ~2.5-3 min in all
    python scripts/shapeworld_vqgan.py --smoke --output-dir /tmp/vqgan-smoke     # CPU, ~15 s

Outputs in --output-dir: `vqgan/` (`save_pretrained`: config.json + model.safetensors, float32; what
`convert_checkpoint.py --vqgan` takes), `summary.json` (steps, time, images/s; on held-out "test" scenes and on
"heldout" scenes: PSNR, the checker's pass rate on reconstructions, codes used, code perplexity over all cells and over
plain-background cells), `log.jsonl`, `reconstructions.png` (test images over their reconstructions) and
`checkpoint/`.

Recipe. World images are flat colours on white, so no GAN or perceptual loss: an L2 reconstruction loss plus the VQ
losses (codebook + 0.25 x commitment, what `ArmorVQGANModel.forward` computes). L2, not L1: with ~95% near-white
pixels, L1's per-pixel sign gradients from the background drown the colour signal of the few object pixels; in a
300-step CPU probe L1 drew every object as a red-brown blob while L2 drew the right colours. The first
--ae-warmup-steps train a plain autoencoder (no quantizer), then the codebook is set to k-means centroids of the
encoder's latents, so codes start where latents are; afterwards codes unused for --reset-every steps restart at
random latents of the current batch (until --reset-until of the run). Both take latents of object cells only (cells
whose 16x16 patch shows a shape): fed every cell, ~90% of them plain background, k-means and restarts put most of the
codebook on background latents, which vary with the distance to the nearest shape; a first run's 512 codes gave plain
background cells a code perplexity of 136: for every empty cell the generator had to guess as if among 136 equally
likely codes. Codes on shapes leave the background a few codes. AdamW, linear warm-up then cosine decay, bf16
autocast on CUDA (the nearest-code search stays in float32), gradient clipping.

Resuming. Every --save-every steps and when the run stops, the weights (`checkpoint/model.safetensors`) and the
optimizer, step and code-usage counters (`checkpoint/trainer_state.pt`) are written, atomically. Rerunning the same
command continues from the last saved step and reaches the same weights as an uninterrupted run (bitwise on CPU):
batch `s` is rendered from seeds derived from (--seed, s) and the learning rate is a function of the step. A finished
run (its summary says it reached --steps) is skipped. --time-budget-s stops training cleanly when this invocation's
training time runs out; the VQGAN is then saved and evaluated as it is, and a rerun continues towards --steps.

Data. Batches are rendered on the fly by DataLoader workers from fresh "train" scenes (`shapeworld.world`), so no
image is seen twice and no "test" scene or held-out colour-shape combination is ever trained on. Rendering costs
~0.3 ms per 256px image on one core (~3,500 images/s per worker), far above what the GPU consumes.

Throughput arithmetic. Forward FLOPs per 256px image: 16.5 GFLOP (encoder 4.7, decoder 11.8; the 256px and 128px
levels dominate: one 3x3 conv of 32 -> 32 channels at 256px is 65,536 x 32 x 32 x 9 x 2 = 1.2 GFLOP), so ~50 GFLOP
per image per training step (the backward pass is ~2x the forward). These thin convs are far from the H100's
~990 TFLOP/s bf16 peak: a profile shows the step dominated by elementwise kernels (GroupNorm, which autocast runs in
float32, SiLU, dtype casts) over ~21M activation elements per image. Measured on one H100 (torch 2.11, bf16
autocast, batch 64): 415 images/s for the wider multipliers 1,2,2,4,4 (29 GFLOP forward, ~36 TFLOP/s effective) and
~500 images/s for these defaults (a 25 s probe, its ~6 s start-up subtracted). At batch 16 that is ~31 steps/s, so the
default 3,500 steps (56,000 images) take ~110-135 s, inside the default 150 s --time-budget-s; start-up (imports,
workers, cuDNN autotuning) and the evaluation add ~20-30 s: ~2.5-3 minutes of GPU time in all. Beside the base
model's training, as scripts/shapeworld.sh runs them, the two share the machine's CPUs and GPU: on an H200 the VQGAN
then ran at ~170 images/s and reached 1,780 of its 3,500 steps in a 170 s budget.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: F401,E402  (registers the package `armor`)

# isort: split
from armor.configuration_armor import ArmorVQGANConfig  # noqa: E402
from armor.modeling_vqgan import ArmorVQGANModel  # noqa: E402
from shapeworld.checker import score  # noqa: E402
from shapeworld.data import scene_spec  # noqa: E402
from shapeworld.training import (  # noqa: E402
    RunError,
    add_schedule_arguments,
    autocast,
    check_schedule_args,
    learning_rate_at,
    load_checkpoint,
    save_checkpoint,
)
from shapeworld.world import BACKGROUND, Scene, render, sample_scene  # noqa: E402

SUMMARY_FILE = "summary.json"
LOG_FILE = "log.jsonl"
VQGAN_DIR = "vqgan"
# Settings that decide the weights a run reaches; a resumed run must keep them (--steps may change: it is the target).
RUN_SETTINGS = (
    "image_size",
    "crop_size",
    "codebook_size",
    "embed_dim",
    "latent_channels",
    "base_channels",
    "channel_multiplier",
    "num_res_blocks",
    "batch_size",
    "learning_rate",
    "min_learning_rate_ratio",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "reconstruction_loss",
    "ae_warmup_steps",
    "kmeans_images",
    "reset_every",
    "reset_until",
    "seed",
)
SMOKE_DEFAULTS = {
    "device": "cpu",
    "steps": 2,
    "batch_size": 2,
    "codebook_size": 64,
    "embed_dim": 16,
    "latent_channels": 32,
    "base_channels": 32,
    "channel_multiplier": "1,1,1,1,1",
    "warmup_steps": 0,
    "ae_warmup_steps": 1,
    "kmeans_images": 2,
    "reset_every": 1,
    "eval_images": 4,
    "workers": 0,
    "save_every": 1,
    "log_every": 1,
    "time_budget_s": 60.0,
}


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/shapeworld/vqgan", help="checkpoint, vqgan/, summary.json")
    add_schedule_arguments(parser, steps=3500, time_budget_s=150.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256, help="training resolution (a multiple of 16)")
    parser.add_argument(
        "--crop-size", type=int, default=None, help="train on random windows of this size (default: whole images)"
    )
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=32, help="codebook vector size")
    parser.add_argument("--latent-channels", type=int, default=64, help="encoder output channels (z_channels)")
    parser.add_argument("--base-channels", type=int, default=32, help="channels of the full-resolution level (ch)")
    parser.add_argument(
        "--channel-multiplier", default="1,1,2,2,4", help="per-level multipliers (ch_mult); n levels: 2^(n-1)x"
    )
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="on conv weights only")
    parser.add_argument("--reconstruction-loss", choices=("l1", "l2", "l1+l2"), default="l2")
    parser.add_argument(
        "--ae-warmup-steps", type=int, default=300, help="first train a plain autoencoder (no quantizer) this long"
    )
    parser.add_argument(
        "--kmeans-images", type=int, default=64, help="images whose latents k-means turns into the codebook"
    )
    parser.add_argument("--reset-every", type=int, default=100, help="restart codes unused for this many steps")
    parser.add_argument("--reset-until", type=float, default=0.8, help="no restarts after this fraction of --steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=256, help="held-out images per split for PSNR")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(8, cpus - 2))")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps of batch 2: checks the script")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)  # explicit options still win
    args = parser.parse_args(argv)
    try:
        args.channel_multiplier = [int(value) for value in str(args.channel_multiplier).split(",")]
    except ValueError as error:
        raise RunError(f"--channel-multiplier must be comma-separated integers such as 1,1,2,2,4 ({error}).") from None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers is None:
        args.workers = min(8, max(0, (os.cpu_count() or 2) - 2))
    check_args(args)
    return args


def check_args(args: argparse.Namespace):
    factor = 2 ** (len(args.channel_multiplier) - 1)
    positive = ("steps", "batch_size", "codebook_size", "embed_dim", "latent_channels", "num_res_blocks")
    positive += ("eval_images", "save_every", "log_every", "reset_every", "kmeans_images")
    for name in positive:
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("warmup_steps", "workers", "ae_warmup_steps"):
        if getattr(args, name) < 0:
            raise RunError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}.")
    if min(args.channel_multiplier) < 1:
        raise RunError(f"--channel-multiplier values must be at least 1, got {args.channel_multiplier}.")
    if args.base_channels < 32 or args.base_channels % 32:
        raise RunError(f"--base-channels must be a multiple of 32 (GroupNorm's 32 groups), got {args.base_channels}.")
    if args.image_size < 32 or args.image_size % factor:
        raise RunError(
            f"--image-size must be a multiple of {factor} (the downsampling of {len(args.channel_multiplier)} "
            f"resolution levels) and at least 32, got {args.image_size}."
        )
    if args.crop_size is None:
        args.crop_size = args.image_size
    if args.crop_size < factor or args.crop_size % factor or args.crop_size > args.image_size:
        raise RunError(
            f"--crop-size must be a multiple of {factor} (the latent grid) between {factor} and --image-size "
            f"({args.image_size}), got {args.crop_size}."
        )
    check_schedule_args(args)
    if not 0 <= args.reset_until <= 1:
        raise RunError(f"--reset-until is a fraction of --steps in [0, 1], got {args.reset_until}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {args.device}: CUDA is not available here; pass --device cpu (or --smoke).")


def vqgan_config(args: argparse.Namespace) -> ArmorVQGANConfig:
    return ArmorVQGANConfig(
        embed_dim=args.embed_dim,
        num_embeddings=args.codebook_size,
        latent_channels=args.latent_channels,
        resolution=args.image_size,
        base_channels=args.base_channels,
        channel_multiplier=list(args.channel_multiplier),
        num_res_blocks=args.num_res_blocks,
        attn_resolutions=[],
        dropout=0.0,
        attn_type="vanilla",  # the mid blocks' attention, at the 16x16 latent grid
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def scenes_of(split: str, seeds: list[str]) -> list[Scene]:
    """One world scene of `split` per seed string (stable across processes)."""
    return [sample_scene(random.Random(seed), split) for seed in seeds]


def render_images(scenes: list[Scene], image_size: int) -> torch.Tensor:
    """uint8 [len(scenes), 3, S, S]."""
    images = np.stack([np.asarray(render(scene, image_size)) for scene in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def object_cells(pixels: torch.Tensor, grid: int) -> torch.BoolTensor:
    """[B, H / grid, W / grid]: the latent cells whose grid x grid pixel patch shows anything but background."""
    background = torch.tensor(BACKGROUND, device=pixels.device).view(1, 3, 1, 1) / 255.0 * 2.0 - 1.0
    drawn = (pixels - background).abs().amax(dim=1, keepdim=True) > 1e-3
    return F.max_pool2d(drawn.float(), kernel_size=grid).squeeze(1) > 0


def object_latents(latents: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """[N, D]: the latents of object cells (all latents if the batch shows no object), for placing codes."""
    cells = object_cells(pixels, pixels.shape[-1] // latents.shape[-1])
    flat = latents.permute(0, 2, 3, 1)
    return flat[cells] if cells.any() else flat.reshape(-1, latents.shape[1])


class WorldBatches(torch.utils.data.Dataset):
    """
    Item `i` is the training batch of step `first_step + i`: fresh "train" scenes seeded by step, rendered at
    `image_size`, each cut to a random `crop_size` window on the latent grid (the convolutional VQGAN does not care
    which window of an image it sees, and a smaller window is proportionally cheaper to train on).
    """

    def __init__(self, first_step: int, last_step: int, args: argparse.Namespace):
        self.first_step, self.last_step = first_step, last_step
        self.batch_size, self.image_size, self.crop_size = args.batch_size, args.image_size, args.crop_size
        self.grid = 2 ** (len(args.channel_multiplier) - 1)
        self.seed = args.seed

    def __len__(self) -> int:
        return self.last_step - self.first_step

    def __getitem__(self, index: int) -> torch.Tensor:
        step = self.first_step + index
        seeds = [f"vqgan-train-{self.seed}-{step}-{item}" for item in range(self.batch_size)]
        images = render_images(scenes_of("train", seeds), self.image_size)
        if self.crop_size == self.image_size:
            return images
        rng = random.Random(f"vqgan-crop-{self.seed}-{step}")
        cells = (self.image_size - self.crop_size) // self.grid
        crops = []
        for image in images:
            top, left = (rng.randint(0, cells) * self.grid for _ in range(2))
            crops.append(image[:, top : top + self.crop_size, left : left + self.crop_size])
        return torch.stack(crops)


def eval_scenes(split: str, count: int) -> list[Scene]:
    """The fixed held-out set: the same `count` scenes for every run and seed, so figures compare across runs."""
    return scenes_of(split, [f"vqgan-eval-{split}-{index}" for index in range(count)])


def to_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 in [-1, 1], Chameleon's x / 255 * 2 - 1."""
    return images.to(device, non_blocking=True).float() / 255.0 * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def build_optimizer(model: ArmorVQGANModel, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on conv weights only (decay would pull codebook vectors and norms towards zero)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.ndim == 4 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99), eps=1e-8)


def training_losses(
    model: ArmorVQGANModel, pixels: torch.Tensor, args: argparse.Namespace, quantize: bool = True
) -> dict:
    """
    `ArmorVQGANModel.forward`, with the quantizer outside bf16 autocast: nearest-code search in bf16 would pick
    neighbours of the true nearest code, which the float32 `encode` of the saved model then disagrees with.
    `quantize=False` is the plain autoencoder of the warm-up: the decoder reads the encoder's latents directly.
    """
    with autocast(pixels.device, True):
        latents = model.quant_conv(model.encoder(pixels))
    if quantize:
        with autocast(pixels.device, False):
            quantized, embedding_loss, indices = model.quantize(latents.float())
    else:
        quantized, embedding_loss, indices = latents, torch.zeros((), device=pixels.device), None
    with autocast(pixels.device, True):
        reconstruction = model.decoder(model.post_quant_conv(quantized)).float()
    error = reconstruction - pixels
    if args.reconstruction_loss == "l1":
        reconstruction_loss = error.abs().mean()
    elif args.reconstruction_loss == "l2":
        reconstruction_loss = error.square().mean()
    else:
        reconstruction_loss = error.abs().mean() + error.square().mean()
    return {
        "loss": reconstruction_loss + embedding_loss,
        "reconstruction_loss": reconstruction_loss,
        "embedding_loss": embedding_loss,
        "latents": latents.detach().float(),
        "codes": indices,
    }


@torch.no_grad()
def kmeans_codebook(model: ArmorVQGANModel, args: argparse.Namespace, iterations: int = 20) -> float:
    """
    Codebook := k-means centroids of the warmed-up encoder's object-cell latents (`object_latents`) over
    `--kmeans-images` fresh "train" images, so that every code starts where latents are (a random codebook leaves
    most codes dead and merges colours) and the codes go to shapes, not to the ~90% of cells that are plain
    background. Returns the mean squared distance of those latents to their centroid.
    """
    seeds = [f"vqgan-kmeans-{args.seed}-{index}" for index in range(args.kmeans_images)]
    images = render_images(scenes_of("train", seeds), args.image_size)
    points = []
    for chunk in images.split(16):
        pixels = to_pixels(chunk, model.device)
        with autocast(model.device, True):
            latents = model.quant_conv(model.encoder(pixels)).float()
        points.append(object_latents(latents, pixels))
    points = torch.cat(points)
    generator = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(points.shape[0], generator=generator)[: args.codebook_size]
    picks = picks.repeat(math.ceil(args.codebook_size / picks.numel()))[: args.codebook_size].to(points.device)
    centroids = points[picks].clone()
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=args.codebook_size).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty clusters stay put
    model.quantize.embedding.weight.copy_(centroids)
    return float(torch.cdist(points, centroids).min(dim=1).values.square().mean())


@torch.no_grad()
def restart_dead_codes(
    model: ArmorVQGANModel,
    optimizer: torch.optim.Optimizer,
    usage: torch.Tensor,
    latents: torch.Tensor,
    pixels: torch.Tensor,
    step: int,
    seed: int,
) -> int:
    """Codes unused since the last check become random object-cell latents of the current batch (as in
    `kmeans_codebook`); their Adam moments restart."""
    dead = (usage == 0).nonzero().squeeze(1)
    if dead.numel() == 0:
        return 0
    flat = object_latents(latents, pixels)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    picks = torch.randint(flat.shape[0], (dead.numel(),), generator=generator).to(flat.device)
    weight = model.quantize.embedding.weight
    weight[dead] = flat[picks].to(weight.dtype)
    state = optimizer.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return int(dead.numel())


def settings_of(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in RUN_SETTINGS}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def perplexity(codes: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the codes' frequencies: how many codes are in effective use."""
    counts = torch.bincount(codes.flatten(), minlength=num_codes).double()
    probabilities = counts[counts > 0] / counts.sum()
    return round(float(torch.exp(-(probabilities * probabilities.log()).sum())), 1)


@torch.no_grad()
def evaluate(model: ArmorVQGANModel, scenes: list[Scene], image_size: int, batch_size: int) -> dict:
    """
    On the images of `scenes`, in the float32 model as saved and on the uint8 pixels a user gets
    (`decode(..., output_type="pil")`'s clamp and truncation):

    * PSNR of `decode(encode(image))` against the image, averaged over images;
    * `checker_pass`: the share of reconstructions in which `shapeworld.checker` finds exactly the scene (every
      object's shape, colour, size and position, nothing else), the ceiling of any drawing the generator makes;
    * the codes used, their perplexity, and `background_code_perplexity`, the perplexity over plain-background
      cells alone: a generator has to guess among that many codes for every empty cell, so low is better.
    """
    model.eval()
    images = render_images(scenes, image_size)
    psnrs, codes, reconstructions, background = [], [], [], []
    for chunk in images.split(batch_size):
        pixels = to_pixels(chunk, model.device)
        chunk_codes = model.encode(pixels)
        decoded = ((model.decode(chunk_codes).float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255).to(torch.uint8).cpu()
        mse = (decoded.float() - chunk.float()).square().mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(255.0**2 / mse.clamp_min(1e-10)))
        codes.append(chunk_codes.cpu())
        background.append(chunk_codes[~object_cells(pixels, model.config.downsample_factor)].cpu())
        reconstructions.append(decoded)
    psnr, codes, reconstructions = torch.cat(psnrs), torch.cat(codes), torch.cat(reconstructions)
    passes = [
        score(scene_spec(scene), Image.fromarray(pixels.permute(1, 2, 0).numpy()))["pass"]
        for scene, pixels in zip(scenes, reconstructions)
    ]
    num_codes = model.config.num_embeddings
    return {
        "images": len(scenes),
        "psnr_db": round(float(psnr.mean()), 3),
        "psnr_min_db": round(float(psnr.min()), 3),
        "checker_pass": round(sum(passes) / len(passes), 4),
        "codes_used": int(codes.unique().numel()),
        "code_perplexity": perplexity(codes, num_codes),
        "background_code_perplexity": perplexity(torch.cat(background), num_codes),
        "code_grid": list(codes.shape[1:]),
        "images_uint8": images,
        "reconstructions": reconstructions,
    }


def save_reconstructions(path: Path, images: torch.Tensor, reconstructions: torch.Tensor, count: int = 8):
    """Originals on the top row, their reconstructions below."""
    count = min(count, images.shape[0])
    rows = [torch.cat(list(batch[:count]), dim=2) for batch in (images, reconstructions)]
    Image.fromarray(torch.cat(rows, dim=1).permute(1, 2, 0).numpy()).save(path)


def print_table(summary: dict):
    test, heldout = summary["eval"]["test"], summary["eval"]["heldout"]
    print(f"\nshape-world VQGAN on {summary['device']} ({summary['output_dir']})")
    print(
        "| steps | train time (s) | images/s | batch | PSNR test / held-out combos (dB) | checker pass on "
        "reconstructions, test / held-out | codes used | code perplexity, all / background cells |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {summary['step']} / {summary['steps']} | {summary['train_seconds']:.1f} | "
        f"{summary['images_per_second']:.4g} | {summary['batch_size']} | {test['psnr_db']:.2f} / "
        f"{heldout['psnr_db']:.2f} | {test['checker_pass']:.1%} / {heldout['checker_pass']:.1%} | "
        f"{test['codes_used']} / {summary['codebook_size']} | {test['code_perplexity']} / "
        f"{test['background_code_perplexity']} |"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    output_dir = Path(args.output_dir)
    summary_path = output_dir / SUMMARY_FILE
    if summary_path.is_file() and (output_dir / VQGAN_DIR / "config.json").is_file():
        previous = json.loads(summary_path.read_text())
        same_settings = previous.get("settings") == settings_of(args)
        if previous.get("finished") and same_settings and previous.get("step", 0) >= args.steps:
            print(f"{output_dir}: finished run ({previous['step']} steps), skipped; delete the folder to retrain.")
            print_table(previous)
            return {**previous, "skipped": True}
    output_dir.mkdir(parents=True, exist_ok=True)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = vqgan_config(args)
    model = ArmorVQGANModel(config).to(device).train()
    optimizer = build_optimizer(model, args)
    state = load_checkpoint(output_dir, model, optimizer, settings_of(args))
    if state is None:
        state = {"step": 0, "train_seconds": 0.0, "images_seen": 0, "restarted_codes": 0}
        state["code_usage"] = torch.zeros(config.num_embeddings, dtype=torch.long)
    state["settings"] = settings_of(args)
    start_step = state["step"]
    stop_step = max(start_step, args.steps if args.stop_at is None else min(args.stop_at, args.steps))
    usage = state["code_usage"].to(device)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"VQGAN {parameters / 1e6:.2f}M parameters, {args.image_size}px -> "
        f"{args.image_size // config.downsample_factor}^2 codes of {config.num_embeddings}; steps {start_step} -> "
        f"{stop_step} of {args.steps}, batch {args.batch_size}, {device}, budget {args.time_budget_s:.0f} s"
    )
    print("settings: " + json.dumps({**settings_of(args), "workers": args.workers, "device": args.device}))

    loader = torch.utils.data.DataLoader(
        WorldBatches(start_step, stop_step, args),
        batch_size=None,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
    )
    log_file = open(output_dir / LOG_FILE, "a")
    totals = torch.zeros(3, device=device)  # loss, reconstruction loss, embedding loss since the last log line
    step, stopped_by = start_step, "steps" if args.stop_at is None or args.stop_at >= args.steps else "stop_at"
    started = window_started = time.perf_counter()
    window_start_step = step
    for images in loader:
        if step == args.ae_warmup_steps and args.ae_warmup_steps > 0:
            distance = kmeans_codebook(model, args)
            print(f"step {step}: autoencoder warm-up done, codebook = k-means of latents (distance^2 {distance:.4g})")
        quantize = step >= args.ae_warmup_steps
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args)
        pixels = to_pixels(images, device)
        losses = training_losses(model, pixels, args, quantize=quantize)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if quantize:
            codes = losses["codes"].flatten()  # index_add_, unlike bincount, does not wait for the GPU
            usage.index_add_(0, codes, torch.ones_like(codes))
        totals += torch.stack([losses[key].detach() for key in ("loss", "reconstruction_loss", "embedding_loss")])
        step += 1

        if step % args.log_every == 0 or step == stop_step:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            loss, reconstruction_loss, embedding_loss = (totals / (step - window_start_step)).tolist()
            entry = {
                "step": step,
                "loss": round(loss, 5),
                "reconstruction_loss": round(reconstruction_loss, 5),
                "embedding_loss": round(embedding_loss, 5),
                "learning_rate": learning_rate_at(step - 1, args),
                "codes_used": int((usage > 0).sum()),  # since the last restart check
                "restarted_codes": state["restarted_codes"],
                "images_per_second": round((step - window_start_step) * args.batch_size / (now - window_started), 1),
            }
            print(json.dumps(entry), flush=True)
            log_file.write(json.dumps(entry) + "\n")
            totals.zero_()
            window_started, window_start_step = now, step
        quantized_steps = step - args.ae_warmup_steps
        if quantize and quantized_steps % args.reset_every == 0:
            if step <= args.reset_until * args.steps:
                state["restarted_codes"] += restart_dead_codes(
                    model, optimizer, usage, losses["latents"], pixels, step, args.seed
                )
            usage.zero_()
        if step % args.save_every == 0 and step < stop_step:
            seconds = time.perf_counter() - started
            state.update(step=step, code_usage=usage.cpu())
            save_checkpoint(output_dir, model, optimizer, {**state, "train_seconds": state["train_seconds"] + seconds})
        if time.perf_counter() - started >= args.time_budget_s and step < stop_step:
            stopped_by = "time_budget"
            print(f"time budget of {args.time_budget_s:.0f} s spent at step {step}; rerun to continue to {args.steps}")
            break
    del loader
    log_file.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images_this_run = (step - start_step) * args.batch_size
    state.update(
        step=step,
        train_seconds=state["train_seconds"] + seconds,
        images_seen=state["images_seen"] + images_this_run,
    )
    if step > start_step:
        state["code_usage"] = usage.cpu()
        save_checkpoint(output_dir, model, optimizer, state)

    if 0 < step <= args.ae_warmup_steps:
        # Stopped before the quantizer was switched on: give the saved VQGAN a codebook fitted to its latents (the
        # checkpoint is already written; a resumed run fits the codebook again when it reaches the end of warm-up).
        kmeans_codebook(model, args)
    staging = output_dir / f"{VQGAN_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-file "Writing model shards" bar, noise in the log
    model.eval().save_pretrained(staging)
    if progress_bars:
        hf_logging.enable_progress_bar()
    shutil.rmtree(output_dir / VQGAN_DIR, ignore_errors=True)
    staging.rename(output_dir / VQGAN_DIR)

    evaluation = {}
    for split in ("test", "heldout"):
        scenes = eval_scenes(split, args.eval_images)
        evaluation[split] = evaluate(model, scenes, args.image_size, batch_size=max(1, min(64, args.batch_size * 4)))
        images, reconstructions = evaluation[split].pop("images_uint8"), evaluation[split].pop("reconstructions")
        if split == "test":
            save_reconstructions(output_dir / "reconstructions.png", images, reconstructions)

    summary = {
        "step": step,
        "steps": args.steps,
        "finished": step >= args.steps,
        "stopped_by": stopped_by,
        "train_seconds": round(state["train_seconds"], 2),
        "train_seconds_this_run": round(seconds, 2),
        "images_seen": state["images_seen"],
        "images_per_second": round(images_this_run / seconds, 1) if images_this_run else 0.0,
        "batch_size": args.batch_size,
        "codebook_size": config.num_embeddings,
        "parameters": parameters,
        "restarted_codes": state["restarted_codes"],
        "eval": evaluation,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "output_dir": str(output_dir),
        "vqgan": str(output_dir / VQGAN_DIR),
        "settings": settings_of(args),
        "vqgan_config": config.to_dict(),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    try:
        args = parse_args(argv)
        return run(args)
    except RunError as error:
        raise SystemExit(f"shapeworld_vqgan.py: {error}") from None


if __name__ == "__main__":
    main()
