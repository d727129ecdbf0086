"""Shape world, step 2: train the base model, a small InternVL2.5, on ti2t + t2t records; the stand-in for a release.

The model is transformers' own `InternVLForConditionalGeneration`: an InternViT-style vision tower (192 wide, 4 layers,
3 heads, 448px tiles cut into 28px patches, so 16x16 patches), pixel shuffle 0.5 (8x8 = 64 image tokens per tile),
InternVL's MLP projector and a Qwen2 LLM (256 wide, 6 layers, 4 heads / 2 KV heads, MLP 1024, untied output head as in
InternVL2.5, vocabulary = the world tokenizer's V). It learns understanding only: ti2t (describe the image, colour,
shape, count, where, size, exists, relation) and t2t (facts of the world, relations between named objects).

    python scripts/shapeworld_base.py --output-dir runs/shapeworld/base      # one H100, ~200 s of training
    python scripts/shapeworld_base.py --smoke --output-dir /tmp/base-smoke     # CPU, tiny model, ~15 s

Everything goes through the project's code paths: the records are `shapeworld.data.write_dataset`'s (the paper's
conversation layout), turned into InternVL2.5 chat-template sequences with labels on the answers only by
`wohg_data.WoHGDataset` + `build_collator`, with an `ArmorProcessor` whose tokenizer is the world tokenizer with
`<imgbos>`, `<imgend>`, `<imgpad>` appended (`convert_tokenizer`). ti2t and t2t records never draw, so every label is
an id below V and fits the base model's vocabulary (checked on every batch). World images are 256x256, so InternVL2.5's
tiling (up to 12 tiles, `preprocessor_config.json` keeps InternVL2.5's 12) gives each exactly one 448px tile.

Data (`--data-dir`, written once, reused by later runs with the same data options): `train/shard-NN/` (records.jsonl
+ images/, written in parallel), `test/` and `heldout/` (evaluation), `tokenizer-world/` (`train_tokenizer` over
`world_texts`) and `tokenizer/`: that tokenizer with transformers' InternVL names (`start_image_token` <img>,
`end_image_token` </img>, `context_image_token` <IMG_CONTEXT>, `video_token` <video>, the last added at the end, as
the "-hf" exports have it), so V = len(world tokenizer) + 1.

Output in --output-dir:
* `internvl/`: the base as a release is consumed in transformers' native InternVL layout ("-hf"): `config.json`
  (model_type "internvl"), `generation_config.json`, `model.safetensors` (float32), `tokenizer.json` +
  `tokenizer_config.json` (no ARMOR tokens), `chat_template.jinja`, `preprocessor_config.json` (InternVL2.5's tiling,
  `GotOcr2ImageProcessor`) and `processor_config.json` (`InternVLProcessor`, `image_seq_length` 64). It loads with
  `InternVLForConditionalGeneration.from_pretrained` and converts with
  `python convert_checkpoint.py --internvl runs/shapeworld/base/internvl --vqgan ... --image-size 256 --output ...`.
  The weights carry the key names transformers writes for InternVL ("-hf" repos on the Hub: `language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`). `AutoProcessor.from_pretrained` gives
  transformers' `InternVLProcessor` where torchvision is installed (it builds its default video processor; seen on the
  GPU machine: its chat template and tiling give the prompt `build_internvl_prompt` gives and one 448px tile).
* `summary.json`: steps, time, throughput, loss, accuracy; `log.jsonl`: one line per --log-every steps;
  `checkpoint/`: weights + optimizer state for resuming.

Evaluation: exact-match accuracy of greedy answers (`InternVLForConditionalGeneration.generate`) on ti2t and t2t
questions about scenes never trained on ("test": same distribution, other scenes; "heldout": scenes with colour-shape
combinations that never occur in training), per question type. `understanding_accuracy(records, folder,
generate_answers)` takes any `generate_answers(questions, images) -> answers` callable, so the later evaluation scores
ARMOR checkpoints with the same function.

Resuming. Every --save-every steps, and when the run stops, `checkpoint/` is written atomically (weights, optimizer,
step, loss history). Rerunning the same command continues from there with the same data order (batch s holds positions
[s*B, (s+1)*B) of a stream of seeded permutations of the records) and learning-rate schedule (a function of the step).
--time-budget-s stops this invocation's training cleanly; the model is then saved and evaluated as it is and a rerun
continues towards --steps. A finished run is skipped.

Throughput arithmetic (defaults). A ti2t sequence is ~38 tokens of system message and headers (the world tokenizer
merges InternVL2.5's system message into a few tokens) + 66 image tokens + a question of ~10 and an answer of 2-45
tokens; t2t ~60. A batch of 128 (5 ti2t : 1 t2t) is ~11.3k tokens (measured) and ~107 tiles of 257 vision tokens
(27k). Parameters: vision tower 2.28M, projector 0.26M, LLM layers 5.90M, embeddings and head 2 x 0.17M (V = 677):
8.8M, so 6 x 6.6M x 11.3k + 6 x 2.3M x 27k ~ 0.8 TFLOP per step: ~2 ms of H100 bf16 compute. The step is bound by
kernel launches and by the input pipeline instead: InternVL2.5's tiling (256 -> 448 bicubic resize and
normalisation) costs ~19 ms per sample per DataLoader worker. Measured on one H100 (torch 2.11, bf16 autocast, 12
workers, float32 pixels): 2.9 steps/s over the first 100 steps (start-up), then
5.6-6.5 steps/s with 33-39% of the time waiting for data (the GPU side alone would run ~9.5 steps/s); loss 3.96 ->
0.33 in 619 steps (120 s; exact-match accuracy then, learning rate still near its peak: test 56.0%,
ti2t 48.5%, t2t 86.2%). Since then the defaults use 14 workers and send bfloat16 pixels (not measured). At ~6
steps/s the default 1,100 steps take ~34 s + 1,000 / 6 s ~ 200 s of training and see 141k samples, ~3 passes over
the 48k training records (40k ti2t + 8k t2t); --time-budget-s 240 leaves room for a slower machine. Data generation
(51k records, 16 processes) took 13 s; evaluation took 39 s for 3,000 questions in batches of 256 (64 new tokens at
most), so ~20 s for the default 2,250 in batches of 512. The whole command: ~4.5 minutes of GPU time.
"""

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import armor_package  # noqa: F401,E402  (registers the package `armor`)

# isort: split
from armor.convert_tokenizer import convert_tokenizer  # noqa: E402
from armor.processing_armor import (  # noqa: E402
    IMAGE_PLACEHOLDER,
    INTERNVL2_5_CHAT_TEMPLATE,
    ArmorProcessor,
    build_internvl_prompt,
    internvl_image_processor,
)
from armor.wohg_data import WoHGDataset, build_collator  # noqa: E402
from shapeworld.data import (  # noqa: E402
    read_records,
    run_jobs,
    split_counts,
    train_tokenizer,
    world_texts,
    write_dataset,
)
from shapeworld.training import (  # noqa: E402
    RunError,
    add_schedule_arguments,
    autocast,
    check_schedule_args,
    learning_rate_at,
    load_checkpoint,
    save_checkpoint,
)

SUMMARY_FILE = "summary.json"
LOG_FILE = "log.jsonl"
RELEASE_DIR = "internvl"
DATA_MARKER = "shapeworld_base_data.json"
UNDERSTANDING_KINDS = ("ti2t", "t2t")
EVAL_SPLITS = ("test", "heldout")
# transformers' InternVL processor finds the image tokens through these tokenizer attributes ("-hf" exports).
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
END_OF_TURN_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# InternVL2.5's chat template with transformers' InternVL convention for images: the processor expands
# <IMG_CONTEXT> (not InternVL's own <image>) into <img> + image tokens + </img>.
HF_CHAT_TEMPLATE = INTERNVL2_5_CHAT_TEMPLATE.replace("'<image>\\n'", "'<IMG_CONTEXT>\\n'")
# Settings that decide the weights a run reaches; a resumed run must keep them (--steps may change: it is the target).
RUN_SETTINGS = (
    "vision_hidden_size",
    "vision_layers",
    "vision_heads",
    "vision_intermediate_size",
    "patch_size",
    "hidden_size",
    "layers",
    "heads",
    "kv_heads",
    "intermediate_size",
    "batch_size",
    "learning_rate",
    "min_learning_rate_ratio",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "seed",
)
# The data a run trains and is evaluated on; `--data-dir` is reused only when these match.
DATA_SETTINGS = (
    "train_ti2t",
    "train_t2t",
    "test_ti2t",
    "test_t2t",
    "heldout_ti2t",
    "heldout_t2t",
    "data_shards",
    "data_seed",
    "tokenizer_texts_per_kind",
    "tokenizer_vocab_size",
)
SMOKE_DEFAULTS = {
    "device": "cpu",
    "steps": 16,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "vision_intermediate_size": 128,
    "patch_size": 56,  # 8x8 patches, 16 image tokens
    "hidden_size": 64,
    "layers": 2,
    "heads": 2,
    "kv_heads": 1,
    "intermediate_size": 128,
    "train_ti2t": 24,
    "train_t2t": 8,
    "test_ti2t": 12,
    "test_t2t": 4,
    "heldout_ti2t": 2,
    "heldout_t2t": 0,
    "data_shards": 1,
    "tokenizer_texts_per_kind": 8,
    "tokenizer_vocab_size": 512,
    "max_new_tokens": 24,
    "eval_batch_size": 32,
    "workers": 0,
    "threads": 1,  # the tiny model gains nothing from more; oversubscribed OpenMP threads slow it down many times
    "save_every": 1000,
    "log_every": 1,
}


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/shapeworld/base", help="internvl/, summary.json, checkpoint/")
    parser.add_argument("--data-dir", default=None, help="records and tokenizer (default: <output-dir>/data)")
    add_schedule_arguments(parser, steps=1100, time_budget_s=240.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.05, help="on matrices only")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    # the model
    parser.add_argument("--vision-hidden-size", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--vision-heads", type=int, default=3)
    parser.add_argument("--vision-intermediate-size", type=int, default=768)
    parser.add_argument("--patch-size", type=int, default=28, help="448px tiles; 28 gives 16x16 patches, 64 tokens")
    parser.add_argument("--hidden-size", type=int, default=256, help="the Qwen2 LLM's width")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    # the data
    parser.add_argument("--train-ti2t", type=int, default=40_000, help="training records (one scene each)")
    parser.add_argument("--train-t2t", type=int, default=8_000)
    parser.add_argument("--test-ti2t", type=int, default=1_200, help="evaluation questions on unseen scenes")
    parser.add_argument("--test-t2t", type=int, default=300)
    parser.add_argument("--heldout-ti2t", type=int, default=600, help="questions on held-out colour-shape combos")
    parser.add_argument("--heldout-t2t", type=int, default=150)
    parser.add_argument("--data-shards", type=int, default=16, help="training records are written in this many parts")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--tokenizer-texts-per-kind", type=int, default=400, help="world_texts' count_per_kind")
    parser.add_argument("--tokenizer-vocab-size", type=int, default=1024, help="train_tokenizer's byte-level bound")
    # evaluation and bookkeeping
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in evaluation")
    parser.add_argument("--eval-batch-size", type=int, default=512)
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(14, cpus - 2))")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and data, 16 steps: checks the script")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    if parser.parse_args(argv).smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)  # explicit options still win
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers is None:
        args.workers = min(14, max(0, (os.cpu_count() or 2) - 2))
    if args.data_dir is None:
        args.data_dir = str(Path(args.output_dir) / "data")
    check_args(args)
    return args


def check_args(args: argparse.Namespace):
    positive = ("steps", "batch_size", "vision_hidden_size", "vision_layers", "vision_heads", "patch_size")
    positive += ("vision_intermediate_size", "hidden_size", "layers", "heads", "kv_heads", "intermediate_size")
    positive += ("train_ti2t", "data_shards", "max_new_tokens", "eval_batch_size", "save_every", "log_every")
    if args.threads is not None:
        positive += ("threads",)
    for name in positive:
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    not_negative = ("warmup_steps", "workers", "train_t2t", "test_ti2t", "test_t2t", "heldout_ti2t", "heldout_t2t")
    for name in not_negative:
        if getattr(args, name) < 0:
            raise RunError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}.")
    if args.vision_hidden_size % args.vision_heads or args.hidden_size % args.heads or args.heads % args.kv_heads:
        raise RunError(
            "The widths must split into heads: --vision-hidden-size by --vision-heads, --hidden-size by --heads, "
            f"and --heads by --kv-heads (got {args.vision_hidden_size}/{args.vision_heads}, "
            f"{args.hidden_size}/{args.heads}, {args.heads}/{args.kv_heads})."
        )
    tile = internvl_image_processor().size["height"]
    if tile % args.patch_size or (tile // args.patch_size) % 2:
        raise RunError(
            f"--patch-size must cut the {tile}px tile into an even number of patches per side (pixel shuffle 0.5 "
            f"merges 2x2 patches), got {args.patch_size}."
        )
    check_schedule_args(args)
    if args.test_ti2t + args.test_t2t == 0:
        raise RunError("--test-ti2t and --test-t2t are both 0: there is nothing to evaluate the base model on.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {args.device}: CUDA is not available here; pass --device cpu (or --smoke).")


def settings_of(args: argparse.Namespace, names: tuple[str, ...] = RUN_SETTINGS) -> dict:
    return {name: getattr(args, name) for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# Data: records, images and the tokenizer, written once into --data-dir
# ---------------------------------------------------------------------------------------------------------------------


def _train_world_tokenizer(folder: str, seed: int, texts_per_kind: int, vocab_size: int) -> int:
    return train_tokenizer(world_texts(seed, texts_per_kind), folder, vocab_size)


def prepare_data(args: argparse.Namespace) -> dict:
    """
    Write the records and tokenizers into --data-dir unless a complete copy with the same data options is there.
    Returns the paths: `train` (shard folders), `test`, `heldout`, `tokenizer`.
    """
    data_dir = Path(args.data_dir)
    settings = settings_of(args, DATA_SETTINGS)
    marker = data_dir / DATA_MARKER
    paths = {
        "train": [data_dir / "train" / f"shard-{index:02d}" for index in range(args.data_shards)],
        "test": data_dir / "test",
        "heldout": data_dir / "heldout",
        "tokenizer": data_dir / "tokenizer",
        "world_tokenizer": data_dir / "tokenizer-world",
    }
    if marker.is_file():
        written = json.loads(marker.read_text())
        if written.get("settings") != settings:
            differing = {k: (written.get("settings", {}).get(k), v) for k, v in settings.items()}
            details = ", ".join(
                f"--{k.replace('_', '-')} {old} (now {new})" for k, (old, new) in differing.items() if old != new
            )
            raise RunError(
                f"{data_dir} holds data written with other options: {details}. Pass the same options, another "
                "--data-dir, or delete the folder to write it again."
            )
        print(f"data: reusing {data_dir} ({written['records']} records, V = {written['vocab_size']})")
        return paths

    started = time.perf_counter()
    for name in ("train", "test", "heldout", "tokenizer", "tokenizer-world"):  # an interrupted earlier attempt
        shutil.rmtree(data_dir / name, ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            _train_world_tokenizer,
            (str(paths["world_tokenizer"]), args.data_seed, args.tokenizer_texts_per_kind, args.tokenizer_vocab_size),
        )
    ]
    for index, (ti2t, t2t) in enumerate(
        zip(split_counts(args.train_ti2t, args.data_shards), split_counts(args.train_t2t, args.data_shards))
    ):
        seed = args.data_seed * 1000 + index
        jobs.append((write_dataset, (paths["train"][index], {"ti2t": ti2t, "t2t": t2t}, "train", seed)))
    # Shard k of "train" uses seed 1000 x data seed + k; "test" and "heldout" never share a scene with "train" (the
    # split of a scene is a hash of its description), whatever their seed.
    for split in EVAL_SPLITS:
        counts = {"ti2t": getattr(args, f"{split}_ti2t"), "t2t": getattr(args, f"{split}_t2t")}
        if sum(counts.values()):
            jobs.append((write_dataset, (paths[split], counts, split, args.data_seed)))
    results = run_jobs(jobs, max(1, os.cpu_count() or 1))
    world_vocab_size = results[0]

    # The "-hf" tokenizer: InternVL's image tokens named for transformers' InternVL processor (<video> is added).
    tokenizer = Qwen2Tokenizer.from_pretrained(paths["world_tokenizer"], extra_special_tokens=INTERNVL_NAMED_TOKENS)
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(paths["tokenizer"])
    vocab_size = len(tokenizer)
    if vocab_size != world_vocab_size + 1:
        raise RuntimeError(f"Expected the world tokenizer ({world_vocab_size}) + <video>, got {vocab_size} tokens.")
    records = (
        args.train_ti2t
        + args.train_t2t
        + sum(getattr(args, f"{split}_{kind}") for split in EVAL_SPLITS for kind in UNDERSTANDING_KINDS)
    )
    marker.write_text(
        json.dumps({"settings": settings, "records": records, "vocab_size": vocab_size}, indent=2) + "\n"
    )
    print(
        f"data: wrote {records} records and the tokenizer (V = {vocab_size}) in {time.perf_counter() - started:.1f} s"
    )
    return paths


def build_processor(tokenizer_folder: Path, image_seq_length: int, max_tiles: int = 12) -> ArmorProcessor:
    """The processor WoHG's data code needs: the base tokenizer + ARMOR's three tokens at V, V+1, V+2."""
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_folder))
    return ArmorProcessor(
        image_processor=internvl_image_processor(max_tiles),
        tokenizer=convert_tokenizer(tokenizer_folder, vocab_size),
        image_seq_length=image_seq_length,
    )


def training_dataset(sources: list[Path], processor: ArmorProcessor, seed: int) -> WoHGDataset:
    """ti2t / t2t records as InternVL2.5 chat sequences, labels on the answers; no drawn images, so no VQGAN."""
    dataset = WoHGDataset(
        [str(source) for source in sources],
        processor,
        model="",  # a VQGAN is only looked up for records that draw; these never do
        image_size=0,
        num_codes=processor.num_image_codes,
        check_images=False,  # written by this script a moment ago
        seed=seed,
    )
    kinds = dataset.kinds()
    if set(kinds) - set(UNDERSTANDING_KINDS):
        raise RunError(
            f"The training data holds {dict(kinds)}; the base model learns understanding only (ti2t and t2t)."
        )
    return dataset


class StepBatches(torch.utils.data.Sampler):
    """
    The index batches of steps `first_step` to `last_step`: step s takes positions [s*B, (s+1)*B) of the stream of
    seeded permutations of the records (one per epoch), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, size: int, batch_size: int, first_step: int, last_step: int, seed: int):
        self.size, self.batch_size, self.first_step, self.last_step, self.seed = (
            size,
            batch_size,
            first_step,
            last_step,
            seed,
        )
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return self.last_step - self.first_step

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._order[offset]

    def __iter__(self):
        for step in range(self.first_step, self.last_step):
            yield [self._index(position) for position in range(step * self.batch_size, (step + 1) * self.batch_size)]


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


def base_config(args: argparse.Namespace, tokenizer) -> InternVLConfig:
    """InternVL2.5's architecture at toy size; token ids from the tokenizer, as a release's config has them."""
    tile = internvl_image_processor().size["height"]
    vision_config = InternVLVisionConfig(
        hidden_size=args.vision_hidden_size,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        intermediate_size=args.vision_intermediate_size,
        image_size=tile,
        patch_size=args.patch_size,
        hidden_act="gelu",
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        attention_bias=True,  # InternViT-300M's qkv bias
        use_qk_norm=False,
        layer_scale_init_value=0.1,
        use_mean_pooling=True,  # InternViT has no norm after its last layer
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    downsample_ratio = 0.5
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=int(tile // args.patch_size * downsample_ratio) ** 2,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def count_parameters(model: InternVLForConditionalGeneration) -> dict:
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "llm_embeddings": model.model.language_model.embed_tokens,
        "llm_layers": model.model.language_model.layers,
        "lm_head": model.lm_head,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases and layer scales)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda")


class PixelsInComputeDtype:
    """
    The collator's batches with the pixel values in bfloat16 when training runs under CUDA bf16 autocast: the patch
    embedding's convolution casts them to bfloat16 anyway, so no result changes, and the ~1 MB per tile that the
    DataLoader's shared memory, pinning and the host-to-device copy move is halved.
    """

    def __init__(self, collator, dtype: torch.dtype):
        self.collator, self.dtype = collator, dtype

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collator(items)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch


def train(
    args: argparse.Namespace,
    model: InternVLForConditionalGeneration,
    dataset: WoHGDataset,
    collator,
    output_dir: Path,
    device: torch.device,
) -> dict:
    """Train from the checkpoint in `output_dir` (or from scratch) towards --steps; returns the state at the stop."""
    optimizer = build_optimizer(model, args, device)
    state = load_checkpoint(output_dir, model, optimizer, {**settings_of(args), **settings_of(args, DATA_SETTINGS)})
    if state is None:
        state = {"step": 0, "train_seconds": 0.0, "samples_seen": 0, "tokens_seen": 0, "losses": [], "runs": []}
    state["settings"], state["data_settings"] = settings_of(args), settings_of(args, DATA_SETTINGS)
    start_step = state["step"]
    stop_step = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    vocab_size = model.config.text_config.vocab_size
    print(
        f"training steps {start_step} -> {stop_step} of {args.steps}, batch {args.batch_size}, {device}, "
        f"budget {args.time_budget_s:.0f} s, {len(dataset)} records {dict(dataset.kinds())}"
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StepBatches(len(dataset), args.batch_size, start_step, max(start_step, stop_step), args.seed),
        collate_fn=collator,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
    )
    model.train()
    log_file = open(output_dir / LOG_FILE, "a")
    window_losses, tokens_this_run, waited = [], 0, 0.0
    step, stopped_by = start_step, "steps" if stop_step == args.steps else "stop_at"
    started = window_started = step_ended = time.perf_counter()
    window_start_step = step
    for batch in loader:
        waited += time.perf_counter() - step_ended  # time the loop waited for the DataLoader
        if int(batch["labels"].max()) >= vocab_size:
            raise RuntimeError(f"A label is >= V = {vocab_size}: the data holds a record that draws an image.")
        tokens_this_run += int(batch["attention_mask"].sum())
        batch = {
            key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()
        }
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args)
        with autocast(device):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        window_losses.append(loss.detach())
        step += 1

        if step % args.log_every == 0 or step == stop_step:
            losses = torch.stack(window_losses).float().cpu().tolist()  # waits for the GPU
            state["losses"].extend(losses)
            now = time.perf_counter()
            entry = {
                "step": step,
                "loss": round(sum(losses) / len(losses), 5),
                "learning_rate": learning_rate_at(step - 1, args),
                "steps_per_second": round((step - window_start_step) / (now - window_started), 2),
                "data_wait": round(waited / (now - window_started), 3),  # share of the time spent waiting for data
            }
            print(json.dumps(entry), flush=True)
            log_file.write(json.dumps(entry) + "\n")
            window_losses, window_started, window_start_step, waited = [], now, step, 0.0
        if step % args.save_every == 0 and step < stop_step:
            save_checkpoint(output_dir, model, optimizer, {**state, "step": step})
        if time.perf_counter() - started >= args.time_budget_s and step < stop_step:
            stopped_by = "time_budget"
            print(f"time budget of {args.time_budget_s:.0f} s spent at step {step}; rerun to continue to {args.steps}")
            break
        step_ended = time.perf_counter()
    del loader
    log_file.close()
    if window_losses:  # stopped by the time budget between two log lines
        state["losses"].extend(torch.stack(window_losses).float().cpu().tolist())
    seconds = time.perf_counter() - started
    state["runs"].append(
        {"first_step": start_step, "last_step": step, "stopped_by": stopped_by, "train_seconds": round(seconds, 2)}
    )
    state.update(
        step=step,
        train_seconds=state["train_seconds"] + seconds,
        samples_seen=state["samples_seen"] + (step - start_step) * args.batch_size,
        tokens_seen=state["tokens_seen"] + tokens_this_run,
        last_run_seconds=seconds,
        last_run_steps=step - start_step,
        last_run_tokens=tokens_this_run,
        stopped_by=stopped_by,
    )
    if step > start_step:
        save_checkpoint(output_dir, model, optimizer, state)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The release folder (transformers' native InternVL layout)
# ---------------------------------------------------------------------------------------------------------------------


def save_release(model: InternVLForConditionalGeneration, tokenizer_folder: Path, folder: Path, max_tiles: int = 12):
    """Weights, configs, tokenizer and processor files as an InternVL "-hf" repository has them; atomically."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    for key in ("is_local", "local_files_only"):  # where this copy was loaded from is no part of the release
        tokenizer.init_kwargs.pop(key, None)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.text_config.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-file "Writing model shards" bar, noise in the log
    model.eval().save_pretrained(staging)
    if progress_bars:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(staging)
    internvl_image_processor(max_tiles).save_pretrained(staging)
    processor_config = {"image_seq_length": model.config.image_seq_length, "processor_class": "InternVLProcessor"}
    (staging / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    (staging / "chat_template.jinja").write_text(HF_CHAT_TEMPLATE)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: exact-match understanding accuracy, for any model behind a `generate_answers` callable
# ---------------------------------------------------------------------------------------------------------------------


def understanding_questions(records: list[dict], folder: Path) -> list[dict]:
    """The ti2t / t2t records as questions: the user's text (no `<image>`), the image path or None, the answer."""
    questions = []
    for record in records:
        meta = record["meta"]
        if meta["kind"] not in UNDERSTANDING_KINDS:
            continue
        human, answer = record["conversations"][0]["value"], meta["answer"]
        images = record.get("image") or []
        if isinstance(images, str):
            images = [images]
        if len(images) != human.count(IMAGE_PLACEHOLDER) or len(images) > 1:
            raise ValueError(f"{record['id']}: an understanding question shows at most one image, with one <image>.")
        question = human.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
        image = folder / images[0] if images else None
        questions.append({"id": record["id"], "kind": meta["kind"], "task": meta["task"], "question": question})
        questions[-1].update(image=image, answer=answer)
    return questions


def understanding_accuracy(
    records: list[dict],
    folder: str | os.PathLike,
    generate_answers: Callable[[list[str], list[Image.Image | None]], list[str]],
    batch_size: int = 64,
    examples: int = 8,
) -> dict:
    """
    Exact-match accuracy (the answer, stripped of surrounding white space, equals the record's `meta["answer"]`) of
    the ti2t and t2t records of a `records.jsonl` whose images lie under `folder`, per kind and per question type.

    `generate_answers(questions, images)` answers a batch: `questions` are the user's texts without `<image>`,
    `images` the matching PIL image or None (t2t). Put the image in front of the question as InternVL2.5's `chat()`
    does (`build_internvl_prompt(question, num_images=1)`). A one-question function `f(question, image)` fits as
    `lambda questions, images: [f(q, i) for q, i in zip(questions, images)]`.

    Returns {"ti2t": {task: {"n", "correct", "accuracy"}, ..., "all": {...}}, "t2t": {...}, "all": {...},
    "wrong_examples": [...]}: the t2t tasks are the facts' families ("corners", "mix", ...) plus "inverse", "bigger".
    """
    questions = understanding_questions(records, Path(folder))
    if not questions:
        raise ValueError(f"No ti2t or t2t records to evaluate in {folder}.")
    correct = defaultdict(lambda: [0, 0])
    wrong = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        images = []
        for question in chunk:
            if question["image"] is None:
                images.append(None)
                continue
            with Image.open(question["image"]) as image:
                images.append(image.convert("RGB"))
        answers = generate_answers([question["question"] for question in chunk], images)
        if len(answers) != len(chunk):
            raise ValueError(f"`generate_answers` returned {len(answers)} answers for {len(chunk)} questions.")
        for question, answer in zip(chunk, answers):
            right = answer.strip() == question["answer"]
            for key in ((question["kind"], question["task"]), (question["kind"], "all"), ("all", "all")):
                correct[key][0] += right
                correct[key][1] += 1
            if not right and len(wrong) < examples:
                wrong.append({k: question[k] for k in ("id", "question", "answer")} | {"generated": answer})
    result: dict = {}
    for (kind, task), (right, total) in sorted(correct.items()):
        result.setdefault(kind, {})[task] = {"n": total, "correct": right, "accuracy": round(right / total, 4)}
    result["all"] = result["all"]["all"]
    result["wrong_examples"] = wrong
    return result


class BaseModelAnswers:
    """Greedy answers of an `InternVLForConditionalGeneration`, with InternVL2.5's prompt and tiling."""

    def __init__(self, model: InternVLForConditionalGeneration, processor: ArmorProcessor, max_new_tokens: int):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.end_of_turn_id = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)

    @torch.no_grad()
    def __call__(self, questions: list[str], images: list[Image.Image | None]) -> list[str]:
        prompts = [build_internvl_prompt(q, num_images=int(image is not None)) for q, image in zip(questions, images)]
        inputs = self.processor(text=prompts, images=[[image] if image is not None else [] for image in images])
        inputs.pop("num_patches_list", None)
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.end_of_turn_id,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        answers = []
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            if self.end_of_turn_id in row:
                row = row[: row.index(self.end_of_turn_id)]
            answers.append(self.processor.tokenizer.decode(row, skip_special_tokens=False))
        return answers


def evaluate_release(folder: Path, data_paths: dict, device: torch.device, args: argparse.Namespace) -> dict:
    """Load the saved release as a user would and score it on every evaluation split that has questions."""
    model = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    processor = build_processor(folder, model.config.image_seq_length, preprocessor.get("max_patches", 12))
    answers = BaseModelAnswers(model, processor, args.max_new_tokens)
    results = {}
    for split in EVAL_SPLITS:
        if getattr(args, f"{split}_ti2t") + getattr(args, f"{split}_t2t") == 0:
            continue
        started = time.perf_counter()
        results[split] = understanding_accuracy(
            read_records(data_paths[split]), data_paths[split], answers, args.eval_batch_size
        )
        results[split]["seconds"] = round(time.perf_counter() - started, 2)
    return results


def format_table(accuracy: dict) -> str:
    """Markdown table: one row per kind and question type, one column per evaluated split."""
    splits = list(accuracy)
    rows = sorted(
        {(kind, task) for split in splits for kind in UNDERSTANDING_KINDS for task in accuracy[split].get(kind, {})}
    )
    lines = [
        "| kind | question | " + " | ".join(f"{split} accuracy (n)" for split in splits) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in splits) + " |",
    ]
    for kind, task in sorted(rows, key=lambda row: (UNDERSTANDING_KINDS.index(row[0]), row[1] == "all", row[1])):
        if kind == "t2t" and task != "all":
            continue  # t2t families are in summary.json
        cells = []
        for split in splits:
            entry = accuracy[split].get(kind, {}).get(task)
            cells.append(f"{entry['accuracy'] * 100:.1f}% ({entry['n']})" if entry else "-")
        name = f"**{task}**" if task == "all" else task
        lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    cells = [
        f"**{accuracy[split]['all']['accuracy'] * 100:.1f}%** ({accuracy[split]['all']['n']})" for split in splits
    ]
    lines.append("| all | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_summary(summary: dict):
    print(f"\nshape-world base model on {summary['device']} ({summary['release']})")
    print(
        f"steps {summary['step']} / {summary['steps']}, train time {summary['train_seconds']:.1f} s, "
        f"{summary['steps_per_second']:.2f} steps/s, {summary['samples_per_second']:.0f} samples/s, "
        f"{summary['tokens_per_step']:.0f} tokens/step; loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
    )
    print(format_table(summary["accuracy"]))


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    output_dir = Path(args.output_dir)
    summary_path = output_dir / SUMMARY_FILE
    if summary_path.is_file() and (output_dir / RELEASE_DIR / "config.json").is_file():
        previous = json.loads(summary_path.read_text())
        same = previous.get("settings") == settings_of(args) and previous.get("data") == settings_of(
            args, DATA_SETTINGS
        )
        if previous.get("finished") and same and previous.get("step", 0) >= args.steps:
            print(f"{output_dir}: finished run ({previous['step']} steps), skipped; delete the folder to retrain.")
            print_summary(previous)
            return {**previous, "skipped": True}
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    print("settings: " + json.dumps({**settings_of(args), "workers": args.workers, "device": args.device}))

    data_started = time.perf_counter()
    data_paths = prepare_data(args)
    data_seconds = time.perf_counter() - data_started
    tokenizer = AutoTokenizer.from_pretrained(data_paths["tokenizer"])
    config = base_config(args, tokenizer)
    processor = build_processor(data_paths["tokenizer"], config.image_seq_length)
    dataset = training_dataset(data_paths["train"], processor, args.seed)

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = InternVLForConditionalGeneration(config).to(device)
    parameters = count_parameters(model)
    print("parameters: " + json.dumps(parameters))
    collator = build_collator(processor)
    if device.type == "cuda":
        collator = PixelsInComputeDtype(collator, torch.bfloat16)
    state = train(args, model, dataset, collator, output_dir, device)

    release = output_dir / RELEASE_DIR
    save_release(model, data_paths["tokenizer"], release)
    eval_started = time.perf_counter()
    accuracy = evaluate_release(release, data_paths, device, args)
    eval_seconds = time.perf_counter() - eval_started

    losses = state["losses"]
    window = max(1, min(50, len(losses) // 10))
    run_steps, run_seconds = state["last_run_steps"], state["last_run_seconds"]
    summary = {
        "step": state["step"],
        "steps": args.steps,
        "finished": state["step"] >= args.steps,
        "stopped_by": state["stopped_by"],
        "runs": state["runs"],
        "train_seconds": round(state["train_seconds"], 2),
        "train_seconds_this_run": round(run_seconds, 2),
        "data_seconds_this_run": round(data_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "steps_per_second": round(run_steps / run_seconds, 3) if run_steps else 0.0,
        "samples_per_second": round(run_steps * args.batch_size / run_seconds, 1) if run_steps else 0.0,
        "tokens_per_step": round(state["last_run_tokens"] / run_steps, 1) if run_steps else 0.0,
        "samples_seen": state["samples_seen"],
        "tokens_seen": state["tokens_seen"],
        "batch_size": args.batch_size,
        "loss_first": round(sum(losses[:window]) / window, 4) if losses else float("nan"),
        "loss_last": round(sum(losses[-window:]) / window, 4) if losses else float("nan"),
        "losses": [round(loss, 4) for loss in losses],
        "accuracy": accuracy,
        "parameters": parameters,
        "vocab_size": config.text_config.vocab_size,
        "image_seq_length": config.image_seq_length,
        "records": dict(dataset.kinds()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "output_dir": str(output_dir),
        "release": str(release),
        "data_dir": str(args.data_dir),
        "settings": settings_of(args),
        "data": settings_of(args, DATA_SETTINGS),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    threads = torch.get_num_threads()
    try:
        args = parse_args(argv)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return run(args)
    except RunError as error:
        raise SystemExit(f"shapeworld_base.py: {error}") from None
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


if __name__ == "__main__":
    main()
