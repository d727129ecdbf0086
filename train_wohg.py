"""WoHG ("what or how to generate") training of ARMOR: the paper's three stages, on the Hugging Face Trainer.

    stage  loss weights (text, image)  trains                                                        lr
    1      1, 0  "what to generate"     image_token_embeddings, adapter, imgbos_head                  4e-5
    2      0, 1  "how to generate"      image_token_embeddings, adapter, visual_head                  1e-4
    3      1, 1  "how to answer better" image_token_embeddings, adapter, visual_head, imgbos_head     5e-5

Shared: AdamW (0.9, 0.999), weight decay 0.05, cosine schedule (3% warmup), gradient clipping 1.0, bf16 where the GPU
supports it; classifier-free-guidance dropout 0.1 in stages 2 and 3 (a sample's context becomes <imgpad>, as the
unconditional rows of `generate`). The base model (LLM, its embeddings and text head, vision tower, projector) stays
frozen, so its answers do not change; `--train-lm-head` (stages 1 and 3) trains the text head too. Stage 1 trains the
adapter as well: the `<imgbos>` score reads the adapter's output, which sees the whole context (the prompt too).

Options, lowest priority first: the stage preset, a YAML/JSON file (`--config`: top-level keys for every stage,
`stage1:` / `stage2:` / `stage3:` sections for one), the command line. They are printed at start.

    python wohg_data.py tokenize --data data/ --model armor-8b      # once: every target image -> VQGAN codes
    python train_wohg.py --stage 1 --model armor-8b --data data/ --output-dir runs/stage1
    python train_wohg.py --stage 2 --model runs/stage1 --data data/ --output-dir runs/stage2
    python train_wohg.py --stage 3 --model runs/stage2 --data data/ --output-dir runs/stage3
    python train_wohg.py --stage all --model armor-8b --data data/ --output-dir runs   # runs/stage1, stage2, stage3
    torchrun --nproc-per-node 8 train_wohg.py ... --deepspeed configs/deepspeed_zero2.json

Each output folder is a complete ARMOR checkpoint (weights, config, generation config, code files, processor,
tokenizer/, vqgan/) that loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`; so is every
`checkpoint-N/` inside it, which `--resume-from-checkpoint auto` continues from.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from transformers import GenerationConfig, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from armor_package import CODE_FILES, REPO_ROOT  # importing it registers the package `armor`

# isort: split
from armor.configuration_armor import ArmorConfig
from armor.modeling_armor import ArmorForConditionalGeneration
from armor.processing_armor import ArmorProcessor
from armor.wohg_data import WoHGDataset, build_collator, vqgan_folder_of

SUMMARY_FILE = "wohg_training.json"

# ---------------------------------------------------------------------------------------------------------------------
# Stages, parts of the model, options
# ---------------------------------------------------------------------------------------------------------------------

STAGES = {
    1: {
        "name": "what to generate",
        "text_loss_weight": 1.0,
        "image_loss_weight": 0.0,
        # The <imgbos> score reads the adapter's output, so deciding when to draw trains the adapter too.
        "trainable": ["image_token_embeddings", "adapter", "imgbos_head"],
        "learning_rate": 4e-5,
        "cfg_drop_prob": 0.0,
    },
    2: {
        "name": "how to generate",
        "text_loss_weight": 0.0,
        "image_loss_weight": 1.0,
        "trainable": ["image_token_embeddings", "adapter", "visual_head"],
        "learning_rate": 1e-4,
        "cfg_drop_prob": 0.1,
    },
    3: {
        "name": "how to answer better",
        "text_loss_weight": 1.0,
        "image_loss_weight": 1.0,
        "trainable": ["image_token_embeddings", "adapter", "visual_head", "imgbos_head"],
        "learning_rate": 5e-5,
        "cfg_drop_prob": 0.1,
    },
}

# Every parameter belongs to exactly one part: (label in the table, parameter name prefixes).
PARTS = {
    "embed_tokens": ("base embedding (embed_tokens)", ("model.language_model.embed_tokens.",)),
    "image_token_embeddings": ("new embedding rows (image_token_embeddings)", ("image_token_embeddings.",)),
    "llm_layers": ("backbone layers + final norm", ("model.language_model.layers.", "model.language_model.norm.")),
    "lm_head": ("text head (lm_head)", ("lm_head.",)),
    "imgbos_head": ("<imgbos> score (imgbos_head)", ("imgbos_head.",)),
    "adapter": ("adapter", ("adapter.",)),
    "visual_head": ("visual head", ("visual_head.",)),
    "vision_tower": ("vision tower", ("model.vision_tower.",)),
    "projector": ("projector", ("model.multi_modal_projector.",)),
    "vqgan": ("VQGAN (never trained: codes are cached)", ("vqgan.",)),
}

# name: (default, help). Stage fields default to the preset (None here).
OPTIONS = {
    "model": (None, "ARMOR checkpoint to start from (folder or Hub id); for --stage all, the one stage 1 starts from"),
    "data": (None, "training data: .jsonl files and/or folders of them (see wohg_data.py)"),
    "output_dir": (None, "where the checkpoint is written (--stage all: <dir>/stage1, stage2, stage3)"),
    "text_loss_weight": (None, "alpha (stage preset)"),
    "image_loss_weight": (None, "beta (stage preset)"),
    "trainable": (None, f"parts to train (stage preset); any of {', '.join(p for p in PARTS if p != 'vqgan')}"),
    "train_lm_head": (False, "also train the text head (stages 1 and 3); changes the base model's text answers"),
    "learning_rate": (None, "peak learning rate (stage preset)"),
    "cfg_drop_prob": (None, "chance that a sample with a target image is trained unconditionally (stage preset)"),
    "adam_beta1": (0.9, "AdamW beta1"),
    "adam_beta2": (0.999, "AdamW beta2"),
    "weight_decay": (0.05, "AdamW weight decay (not on biases and norm weights)"),
    "lr_scheduler_type": ("cosine", "learning-rate schedule"),
    "warmup_ratio": (0.03, "fraction of the steps of linear warmup"),
    "max_grad_norm": (1.0, "gradient clipping"),
    "per_device_train_batch_size": (4, "samples per device per micro-step"),
    "gradient_accumulation_steps": (1, "micro-steps per optimizer step"),
    "num_train_epochs": (1.0, "epochs (ignored when max_steps > 0)"),
    "max_steps": (-1, "optimizer steps (> 0 overrides num_train_epochs)"),
    "bf16": ("auto", "bf16 mixed precision: auto (when the GPU supports it), true or false"),
    "frozen_dtype": (
        "auto",
        "dtype of the frozen weights in memory: auto (as stored when training in bf16; float32 without bf16 or with "
        "FSDP), keep, bfloat16 or float32. Trainable weights are float32 (DeepSpeed keeps its own fp32 copy).",
    ),
    "attn_implementation": (
        None,
        "attention of the LLM, adapter and ViT: sdpa (transformers' default), flash_attention_2 or eager",
    ),
    "gradient_checkpointing": (False, "recompute layer activations in the backward pass (saves memory)"),
    "max_length": (8192, "longer samples are cut before the image that crosses the limit"),
    "max_tiles": (12, "most 448px tiles per input image (InternVL2.5 dynamic tiling)"),
    "system_message": (None, "system message of records without one (default: InternVL2.5's)"),
    "skip_bad_records": (False, "leave bad records out (and report how many) instead of stopping"),
    "check_images": (True, "open every input image once before training"),
    "dataloader_num_workers": (4, "data loading processes"),
    "logging_steps": (10, "log every N steps"),
    "save_steps": (500, "write checkpoint-N every N steps"),
    "save_total_limit": (2, "keep the last N checkpoint-N folders"),
    "seed": (42, "seed of initialisation-free randomness: data order, guidance dropout"),
    "resume_from_checkpoint": (None, "'auto' (latest checkpoint-N in output_dir, if any) or a checkpoint folder"),
    "deepspeed": (None, "DeepSpeed config file, e.g. configs/deepspeed_zero2.json (launch with torchrun/accelerate)"),
    "fsdp_config": (
        None,
        "FSDP2 config file, e.g. configs/fsdp.json: turns FSDP on (launch with torchrun/accelerate)",
    ),
    "dummy_image": (
        "auto",
        "give text-only batches a masked blank tile so every rank runs the vision tower: auto "
        "(with ZeRO-3 or FSDP), true or false",
    ),
    "report_to": ("none", "none, tensorboard, wandb, ..."),
    "run_name": (None, "run name for the loggers"),
}
REQUIRED = ("model", "data", "output_dir")
LIST_OPTIONS = ("data", "trainable")


def parse_value(name: str, value):
    """A value from the command line or a config file, in the type of the option's default."""
    default = OPTIONS[name][0]
    if value is None or name in LIST_OPTIONS:
        return [value] if name in LIST_OPTIONS and isinstance(value, str) else value
    if name in ("bf16", "dummy_image") or isinstance(default, bool):
        lowered = str(value).lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        if lowered == "auto" and not isinstance(default, bool):
            return "auto"
        raise ValueError(
            f"--{name.replace('_', '-')}: expected true or false{' (or auto)' * (default == 'auto')}, got {value!r}."
        )
    if isinstance(default, float) or name in (
        "text_loss_weight",
        "image_loss_weight",
        "learning_rate",
        "cfg_drop_prob",
    ):
        return float(value)
    if isinstance(default, int):
        return int(value)
    return value


def read_config_file(path: str) -> dict:
    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values.")
    return values


def resolve_options(stage: int, cli: dict, config_file: dict) -> dict:
    """Preset < config file (top level, then its `stageN:` section) < command line; checked."""
    layers = [
        {k: v for k, v in config_file.items() if not k.startswith("stage")},
        config_file.get(f"stage{stage}", {}),
    ]
    options = {name: default for name, (default, _) in OPTIONS.items()}
    options.update({k: v for k, v in STAGES[stage].items() if k != "name"})
    for layer in [*layers, cli]:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in OPTIONS:
                raise ValueError(f"Unknown option {key!r}; options are: {', '.join(OPTIONS)}.")
            options[name] = parse_value(name, value)
    options["stage"], options["stage_name"] = stage, STAGES[stage]["name"]

    missing = [name for name in REQUIRED if not options[name]]
    if missing:
        raise ValueError(f"Missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}.")
    trainable = list(dict.fromkeys(options["trainable"] + (["lm_head"] if options["train_lm_head"] else [])))
    unknown = [part for part in trainable if part not in PARTS]
    if unknown:
        raise ValueError(
            f"Unknown part(s) in --trainable: {unknown}; choose from {[p for p in PARTS if p != 'vqgan']}."
        )
    if "vqgan" in trainable:
        raise ValueError("The VQGAN is never trained by WoHG: its codes are the cached targets.")
    if "lm_head" in trainable and options["text_loss_weight"] == 0:
        raise ValueError("--train-lm-head needs a text loss (text_loss_weight > 0); stage 2 has none.")
    if (
        options["text_loss_weight"] < 0
        or options["image_loss_weight"] < 0
        or not (options["text_loss_weight"] or options["image_loss_weight"])
    ):
        raise ValueError("Loss weights must be >= 0 and not both 0.")
    if options["frozen_dtype"] not in ("auto", "keep", "bfloat16", "float32"):
        raise ValueError(f"--frozen-dtype must be auto, keep, bfloat16 or float32, got {options['frozen_dtype']!r}.")
    if not 0 <= options["cfg_drop_prob"] <= 1:
        raise ValueError(f"--cfg-drop-prob must be in [0, 1], got {options['cfg_drop_prob']}.")
    options["trainable"] = trainable
    return options


# ---------------------------------------------------------------------------------------------------------------------
# Parameters: which part, what trains, the table
# ---------------------------------------------------------------------------------------------------------------------


def part_of(name: str) -> str:
    for part, (_, prefixes) in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"Parameter {name} belongs to no part of PARTS; add it there so that freezing stays explicit.")


def set_trainable(model: torch.nn.Module, parts: list[str]) -> list[str]:
    """requires_grad on the parameters of `parts`, off everywhere else; returns the trainable parameter names."""
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(part_of(name) in parts)
        if parameter.requires_grad:
            names.append(name)
    return names


def parameter_table(model: torch.nn.Module) -> tuple[list[dict], str]:
    """Parameters and trainable parameters per part (works on meta-device models)."""
    rows = {
        part: {"part": part, "label": label, "parameters": 0, "trainable": 0} for part, (label, _) in PARTS.items()
    }
    for name, parameter in model.named_parameters():
        row = rows[part_of(name)]
        count = getattr(parameter, "ds_numel", parameter.numel())  # DeepSpeed ZeRO-3 leaves an empty shard
        row["parameters"] += count
        row["trainable"] += count if parameter.requires_grad else 0
    rows = list(rows.values())
    total = sum(row["parameters"] for row in rows)
    trainable = sum(row["trainable"] for row in rows)
    lines = [f"{'part':<44}{'parameters':>16}{'trainable':>16}"]
    lines += [f"{row['label']:<44}{row['parameters']:>16,}{row['trainable']:>16,}" for row in rows]
    lines.append(f"{'total':<44}{total:>16,}{trainable:>16,}  ({trainable / max(total, 1):.1%} trainable)")
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer: the model's own loss, its two parts logged; every checkpoint a complete ARMOR folder
# ---------------------------------------------------------------------------------------------------------------------


class WoHGTrainer(Trainer):
    """The HF Trainer with ARMOR's loss (`outputs.loss`) whose parts are logged as `text_loss` and `image_loss`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The model averages its losses itself; the Trainer then divides by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.first_visual_id = self.accelerator.unwrap_model(self.model).config.imgend_token_id
        self.part_sums = None  # text CE sum, text targets, image CE sum, image targets since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            targets = inputs["labels"][:, 1:]  # routed as the model routes them: ids > V belong to the visual head
            parts = (
                (outputs.text_loss, (targets >= 0) & (targets < self.first_visual_id)),
                (outputs.image_loss, targets >= self.first_visual_id),
            )
            sums = []
            for loss, is_part in parts:
                count = is_part.sum().float()
                sums += [count * (0.0 if loss is None else loss.detach().float()), count]
            sums = torch.stack(sums)
            self.part_sums = sums if self.part_sums is None else self.part_sums + sums
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _issue_warnings_after_load(self, load_result) -> None:
        # On resume, the VQGAN's weights are not in model.safetensors but in vqgan/ (and never change): not missing.
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if not key.startswith("vqgan.")]
        super()._issue_warnings_after_load(load_result)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self.part_sums is not None:  # every rank logs here, so the reduction is collective
            text_sum, text_count, image_sum, image_count = self.accelerator.reduce(self.part_sums, "sum").tolist()
            logs["text_loss"] = round(text_sum / max(text_count, 1), 4)
            logs["image_loss"] = round(image_sum / max(image_count, 1), 4)
            self.part_sums = None
        super().log(logs, start_time)


def finish_checkpoint_folder(folder: Path, processor: ArmorProcessor, vqgan_source: Path):
    """
    The processor (tokenizer/, image processor, chat template), the code files, and the VQGAN copied from the start
    checkpoint (it never trains, and under ZeRO-3 the model's own copy is sharded), so that the folder loads with
    AutoModel / AutoProcessor.from_pretrained(folder, trust_remote_code=True).
    """
    processor.save_pretrained(folder)
    for name in CODE_FILES:
        shutil.copy2(REPO_ROOT / name, folder / name)
    if (folder / "vqgan").resolve() != vqgan_source.resolve():
        shutil.rmtree(folder / "vqgan", ignore_errors=True)
        shutil.copytree(vqgan_source, folder / "vqgan")


class CheckpointCallback(TrainerCallback):
    """Completes each checkpoint-N folder; tells the dataset the epoch (guidance dropout depends on it)."""

    def __init__(self, processor: ArmorProcessor, vqgan_source: Path, dataset: WoHGDataset):
        self.processor, self.vqgan_source, self.dataset = processor, vqgan_source, dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            finish_checkpoint_folder(folder, self.processor, self.vqgan_source)


# ---------------------------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------------------------


def runtime_settings(options: dict, cuda_bf16: bool | None = None) -> tuple[bool, str, bool]:
    """(bf16, frozen weights dtype, dummy image) from the options' "auto" values and the launch (DeepSpeed, FSDP)."""
    bf16 = options["bf16"]
    if bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    zero_stage = 0
    if options["deepspeed"]:
        zero_stage = read_config_file(options["deepspeed"]).get("zero_optimization", {}).get("stage", 0)
    fsdp = bool(options["fsdp_config"])
    frozen_dtype = options["frozen_dtype"]
    if frozen_dtype == "auto":  # FSDP2 wants one dtype per shard group; without autocast all weights must be fp32
        frozen_dtype = "keep" if bf16 and not fsdp else "float32"
    # A sharded module must run on every rank at every step: text-only batches then get a masked blank tile.
    dummy_image = (zero_stage == 3 or fsdp) if options["dummy_image"] == "auto" else options["dummy_image"]
    return bf16, frozen_dtype, dummy_image


def train_stage(options: dict, callbacks: tuple = ()) -> Path:
    """Train one stage from `options` (see `resolve_options`); returns the output checkpoint folder."""
    # -- options ----------------------------------------------------------------------------------------------------
    output_dir = Path(options["output_dir"])
    bf16, frozen_dtype, dummy_image = runtime_settings(options)
    resume = options["resume_from_checkpoint"]
    if resume == "auto":
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    print(f"WoHG stage {options['stage']} ({options['stage_name']})")
    for name in ("stage", *OPTIONS):
        print(f"  {name} = {options[name]}")
    print(f"  -> bf16 = {bf16}, frozen weights = {frozen_dtype}, dummy image = {dummy_image}, resume = {resume}")

    # -- training arguments: before the model, so that DeepSpeed ZeRO-3 can shard the weights as they load ---------
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=options["per_device_train_batch_size"],
        gradient_accumulation_steps=options["gradient_accumulation_steps"],
        num_train_epochs=options["num_train_epochs"],
        max_steps=options["max_steps"],
        learning_rate=options["learning_rate"],
        adam_beta1=options["adam_beta1"],
        adam_beta2=options["adam_beta2"],
        weight_decay=options["weight_decay"],
        lr_scheduler_type=options["lr_scheduler_type"],
        warmup_steps=options["warmup_ratio"],  # a float in [0, 1) is a fraction of the steps
        max_grad_norm=options["max_grad_norm"],
        bf16=bf16,
        gradient_checkpointing=options["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=options["logging_steps"],
        save_strategy="steps",
        save_steps=options["save_steps"],
        save_total_limit=options["save_total_limit"],
        seed=options["seed"],
        dataloader_num_workers=options["dataloader_num_workers"],
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        deepspeed=options["deepspeed"],
        **({"fsdp": True, "fsdp_config": options["fsdp_config"]} if options["fsdp_config"] else {}),
        report_to=options["report_to"],
        run_name=options["run_name"],
    )

    # -- data -------------------------------------------------------------------------------------------------------
    config = ArmorConfig.from_pretrained(options["model"])
    processor = ArmorProcessor.from_pretrained(options["model"])
    dataset = WoHGDataset(
        options["data"],
        processor,
        options["model"],
        image_size=config.generated_image_size,
        num_codes=config.num_image_codes,
        cfg_drop_prob=options["cfg_drop_prob"],
        max_length=options["max_length"],
        max_tiles=options["max_tiles"],
        system_message=options["system_message"],
        skip_bad_records=options["skip_bad_records"],
        check_images=options["check_images"],
        seed=options["seed"],
    )
    kinds = dict(sorted(dataset.kinds().items()))
    print(f"data: {len(dataset)} records {kinds}; {len(dataset.skipped)} bad record(s) skipped")
    for message in dataset.skipped[:20]:
        print(f"  skipped: {message}")
    collator = build_collator(processor, dummy_image=dummy_image)

    # -- model: frozen base, trainable parts in float32 -------------------------------------------------------------
    load_dtype = {"keep": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32}[frozen_dtype]
    attention = options["attn_implementation"]
    model = ArmorForConditionalGeneration.from_pretrained(
        options["model"],
        dtype=load_dtype,
        attn_implementation={"text_config": attention, "vision_config": attention} if attention else None,
    )
    # The class's own from_pretrained skips generation_config.json (transformers reads it only for GenerationMixin
    # models; AutoModel adds that mixin); load it so the output keeps the checkpoint's generation defaults.
    model.generation_config = GenerationConfig.from_pretrained(options["model"])
    saved_loss_weights = (model.config.text_loss_weight, model.config.image_loss_weight)
    model.config.text_loss_weight = options["text_loss_weight"]
    model.config.image_loss_weight = options["image_loss_weight"]
    set_trainable(model, options["trainable"])
    if not options["deepspeed"]:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    table_rows, table = parameter_table(model)
    print(table)

    # -- train ------------------------------------------------------------------------------------------------------
    vqgan_source = vqgan_folder_of(options["model"])
    trainer = WoHGTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,  # no processing_class: the Trainer would rewrite the special ids of the configs
        callbacks=[CheckpointCallback(processor, vqgan_source, dataset), *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)

    # -- the result: a complete ARMOR checkpoint ---------------------------------------------------------------------
    model.config.text_loss_weight, model.config.image_loss_weight = saved_loss_weights
    trainer.save_model(str(output_dir))
    device = trainer.accelerator.device  # every rank: the sum over ranks is collective
    skipped = dataset.skipped_count(lambda flags: trainer.accelerator.reduce(flags.to(device), "sum").cpu())
    if trainer.is_world_process_zero():
        finish_checkpoint_folder(output_dir, processor, vqgan_source)
        summary = {
            "stage": options["stage"],
            "stage_name": options["stage_name"],
            "options": options,
            "global_step": trainer.state.global_step,
            "records": len(dataset),
            "kinds": kinds,
            "skipped_records": skipped,
            "parameters": table_rows,
            "log_history": trainer.state.log_history,
        }
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    print(f"stage {options['stage']} done: {output_dir} (step {trainer.state.global_step})")
    return output_dir


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=["1", "2", "3", "all"], help="WoHG stage, or all three")
    parser.add_argument("--config", help="YAML or JSON file of options (top level, stage1/stage2/stage3 sections)")
    parser.add_argument("--print-options", action="store_true", help="print the resolved options and stop")
    for name, (default, help_text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        shown = f" (default: {default})" if default is not None else ""
        if name in LIST_OPTIONS:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif isinstance(default, bool) or default == "auto":  # `--flag` alone means true
            parser.add_argument(flag, nargs="?", const="true", default=None, help=help_text + shown)
        else:
            parser.add_argument(flag, default=None, help=help_text + shown)
    return parser


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> list[Path]:
    args = vars(build_parser().parse_args(argv))
    stage, config_path, print_only = args.pop("stage"), args.pop("config"), args.pop("print_options")
    cli = {name: value for name, value in args.items() if value is not None}
    config_file = read_config_file(config_path) if config_path else {}
    if stage != "all":
        options = resolve_options(int(stage), cli, config_file)
        if print_only:
            print(json.dumps(options, indent=2))
            return []
        return [train_stage(options, callbacks)]

    # All three stages in order; each starts from the previous one's output; a finished stage is not run again.
    # Every stage's options are resolved and checked before any trains, so a bad stage-3 option fails at once.
    plan, model = [], cli.get("model", config_file.get("model"))
    base = cli.get("output_dir", config_file.get("output_dir"))
    if not model or not base:
        raise ValueError("--stage all needs --model (what stage 1 starts from) and --output-dir.")
    for number in (1, 2, 3):
        stage_cli = {**cli, "model": model, "output_dir": str(Path(base) / f"stage{number}")}
        plan.append(resolve_options(number, stage_cli, config_file))
        runtime_settings(plan[-1])  # reads the DeepSpeed config: a bad one fails now too
        model = plan[-1]["output_dir"]
    for options in plan:
        output = Path(options["output_dir"])
        if print_only:
            print(json.dumps(options, indent=2))
        elif (output / SUMMARY_FILE).is_file():
            print(f"stage {options['stage']} already done: {output}")
        else:
            train_stage(options, callbacks)
    return [Path(options["output_dir"]) for options in plan]


if __name__ == "__main__":
    main()
