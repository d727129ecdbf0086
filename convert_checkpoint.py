#!/usr/bin/env python
"""Convert an InternVL2.5 checkpoint and Chameleon's VQGAN into an ARMOR checkpoint folder.

Reads InternVL2.5 in its release layout (`InternVLChatModel`: InternViT + `mlp1` + InternLM2 or Qwen2) or in
transformers' native layout (`InternVLForConditionalGeneration`, the "-hf" repos), maps it to transformers' native
InternVL names (the understanding half of `ArmorForConditionalGeneration`), adds ARMOR's new parameters, and writes
a self-contained checkpoint: weights, configs, VQGAN, tokenizer, processor, code files and a model card.

Weights stream: every output tensor is planned up front (name, shape, dtype, shard), then made and written in blocks
of rows straight into its shard, so peak memory does not depend on the model size (the largest thing ever held is a
fused q/k/v matrix that must be split, or a 64 MB block of rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import InternVLConfig, InternVLForConditionalGeneration, LlamaConfig, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from armor_package import CODE_FILES, REPO_ROOT  # importing it registers the package `armor`

# isort: split
from armor.configuration_armor import ArmorConfig, ArmorVQGANConfig

AUTO_MAP = {
    "AutoConfig": "configuration_armor.ArmorConfig",
    "AutoModel": "modeling_armor.ArmorForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_armor.ArmorForConditionalGeneration",
}
SUPPORTED_LLMS = ("InternLM2ForCausalLM", "Qwen2ForCausalLM")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Buffers some exports store although no model reads them: they are skipped, never mapped.
IGNORED_SOURCE_PATTERN = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class ConversionError(Exception):
    """A problem with the inputs or options; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading safetensors checkpoints (headers only until a tensor is needed)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives and what it is, read from its shard's header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # byte position of the data in the file


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check the file is as long as the header says (no truncated downloads)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is truncated ({size} bytes, no safetensors header): download it again.")
        header_size = struct.unpack("<Q", prefix)[0]
        if 8 + header_size > size:
            raise ConversionError(
                f"{path} is truncated: its header claims {header_size} bytes but the file has {size}; "
                "download it again."
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(f"{path} is not a safetensors file (unreadable header: {error}).") from error
    entries, data_end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(
                f"{path}: tensor {name} has dtype {info['dtype']}, which this converter cannot read."
            )
        begin = 8 + header_size + info["data_offsets"][0]
        entries[name] = TensorEntry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), begin)
        data_end = max(data_end, info["data_offsets"][1])
    if 8 + header_size + data_end > size:
        raise ConversionError(
            f"{path} is truncated: its header places tensors up to byte {8 + header_size + data_end} but the file has "
            f"{size} bytes (an interrupted download?); download it again."
        )
    return entries


class SafetensorsCheckpoint:
    """The tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint, known from headers."""

    def __init__(self, folder: Path):
        self.folder = folder
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ConversionError(f"{index_path} is not a valid safetensors index ({error}).") from error
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            found = sorted(path.name for path in folder.glob("*.bin")) or sorted(p.name for p in folder.iterdir())
            raise ConversionError(
                f"{folder} has neither model.safetensors nor model.safetensors.index.json (found: {found[:8]}). "
                "Only safetensors checkpoints are read; InternVL2.5 releases ship them."
            )
        file_names = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
        headers = {}
        for file_name in file_names:
            path = folder / file_name
            if not path.is_file():
                raise ConversionError(
                    f"Shard {file_name} named by {index_path.name} is missing from {folder}; download it again."
                )
            headers[file_name] = read_safetensors_header(path)
        if weight_map is None:
            self.entries = headers["model.safetensors"]
        else:
            self.entries = {}
            for name, file_name in weight_map.items():
                if name not in headers[file_name]:
                    raise ConversionError(
                        f"{index_path.name} says tensor {name} is in {file_name}, but that shard does not hold it: "
                        "the index and the shards come from different downloads; download the checkpoint again."
                    )
                self.entries[name] = headers[file_name][name]

    def read_rows(self, name: str, chunk_bytes: int) -> Iterator[torch.Tensor]:
        """
        One tensor as blocks of rows of about `chunk_bytes`, read with plain file reads into fresh buffers: a
        memory-mapped read would keep every page it touched resident until the file is closed, so a large tensor
        would count whole in the peak memory after all.
        """
        entry = self.entries[name]
        if not entry.shape:
            yield self.read((name,))[0]
            return
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        rows = max(1, chunk_bytes // max(1, row_bytes))
        with open(entry.file, "rb") as handle:
            handle.seek(entry.offset)
            for start in range(0, entry.shape[0], rows):
                count = min(rows, entry.shape[0] - start)
                block = torch.empty(count * row_bytes, dtype=torch.uint8)
                if handle.readinto(memoryview(block.numpy())) != block.numel():
                    raise ConversionError(f"{entry.file} ended inside tensor {name}: download the file again.")
                yield block.view(entry.dtype).reshape(count, *entry.shape[1:])

    def read(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        """Load the named tensors; each shard is opened only for the duration of the read, so nothing stays mapped."""
        tensors = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entries[name].file, []).append(name)
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        return [tensors[name] for name in names]


# ---------------------------------------------------------------------------------------------------------------------
# Weight jobs: each reads some source tensors once and produces some target tensors
# ---------------------------------------------------------------------------------------------------------------------


CHUNK_BYTES = 64 * 2**20  # rows are read, made and written in blocks of about this size


@dataclass
class WeightJob:
    """
    Make `targets` (name -> shape) from `sources` (source tensor names; none for fresh weights). Either `build` gets
    the sources whole and returns the targets (splits of fused tensors, all small), or, for a single target, `rows`
    yields it as consecutive blocks of rows (renames, new weights), so that no large tensor is ever held whole.
    """

    sources: tuple[str, ...]
    targets: dict[str, tuple[int, ...]]
    build: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    rows: Callable[[SafetensorsCheckpoint], Iterator[torch.Tensor]] | None = None
    dtype: torch.dtype | None = None  # stored dtype before any --dtype cast (None: that of the first source)


def rename_job(checkpoint: SafetensorsCheckpoint, source: str, target: str) -> WeightJob:
    return WeightJob(
        (source,),
        {target: checkpoint.entries[source].shape},
        rows=lambda reader: reader.read_rows(source, CHUNK_BYTES),
    )


def split_rows_job(checkpoint: SafetensorsCheckpoint, source: str, targets: list[str]) -> WeightJob:
    """InternViT's fused `qkv`: rows are `[q (all heads); k; v]`, so three equal row blocks."""
    shape = checkpoint.entries[source].shape
    rows = shape[0] // len(targets)
    target_shapes = {name: (rows, *shape[1:]) for name in targets}
    return WeightJob((source,), target_shapes, build=lambda tensors: list(tensors[0].split(rows, dim=0)))


def internlm2_wqkv_job(
    checkpoint: SafetensorsCheckpoint, source: str, targets: list[str], num_heads: int, num_kv_heads: int
) -> WeightJob:
    """InternLM2's fused `wqkv`: per KV head j, a block of G query heads, then k head j, then v head j (G = h / kv)."""
    shape = checkpoint.entries[source].shape
    group = num_heads // num_kv_heads
    head_dim = shape[0] // (num_kv_heads * (group + 2))
    if head_dim * num_kv_heads * (group + 2) != shape[0]:
        raise ConversionError(
            f"{source} has {shape[0]} rows, which is not (heads + 2 * kv_heads) * head_dim for {num_heads} heads and "
            f"{num_kv_heads} KV heads: the checkpoint and its config.json disagree."
        )
    rest = shape[1:]

    def build(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        blocks = tensors[0].reshape(num_kv_heads, group + 2, head_dim, *rest)
        query = blocks[:, :group].reshape(num_heads * head_dim, *rest)
        key = blocks[:, group].reshape(num_kv_heads * head_dim, *rest)
        value = blocks[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
        return [query, key, value]

    target_shapes = dict(
        zip(
            targets,
            [(num_heads * head_dim, *rest), (num_kv_heads * head_dim, *rest), (num_kv_heads * head_dim, *rest)],
        )
    )
    return WeightJob((source,), target_shapes, build=build)


_VIT = r"vision_model\.encoder\.layers\.(\d+)\."
_TOWER = r"model.vision_tower.encoder.layer.\1."
RELEASE_VISION_RENAMES = [
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    (_VIT + r"attn\.proj\.(weight|bias)", _TOWER + r"attention.projection_layer.\2"),
    (_VIT + r"attn\.(q_norm|k_norm)\.weight", _TOWER + r"attention.\2.weight"),
    (_VIT + r"mlp\.(fc1|fc2)\.(weight|bias)", _TOWER + r"mlp.\2.\3"),
    (_VIT + r"norm1\.(weight|bias)", _TOWER + r"layernorm_before.\2"),
    (_VIT + r"norm2\.(weight|bias)", _TOWER + r"layernorm_after.\2"),
    (_VIT + r"ls1", _TOWER + r"lambda_1"),
    (_VIT + r"ls2", _TOWER + r"lambda_2"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
]
RELEASE_QWEN2_RENAMES = [
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]
_LM2 = r"language_model\.model\.layers\.(\d+)\."
_LLM = r"model.language_model.layers.\1."
RELEASE_INTERNLM2_RENAMES = [
    (r"language_model\.model\.tok_embeddings\.weight", "model.language_model.embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", "model.language_model.norm.weight"),
    (r"language_model\.output\.weight", "lm_head.weight"),
    (_LM2 + r"attention\.wo\.(weight|bias)", _LLM + r"self_attn.o_proj.\2"),
    (_LM2 + r"feed_forward\.w1\.weight", _LLM + r"mlp.gate_proj.weight"),
    (_LM2 + r"feed_forward\.w3\.weight", _LLM + r"mlp.up_proj.weight"),
    (_LM2 + r"feed_forward\.w2\.weight", _LLM + r"mlp.down_proj.weight"),
    (_LM2 + r"attention_norm\.weight", _LLM + r"input_layernorm.weight"),
    (_LM2 + r"ffn_norm\.weight", _LLM + r"post_attention_layernorm.weight"),
]
# Older "-hf" exports nest the LLM as a causal LM and keep the towers at the top level.
NATIVE_LEGACY_RENAMES = [
    (r"language_model\.lm_head\.(.+)", r"lm_head.\1"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.(.+)", r"model.language_model.\1"),
    (r"vision_tower\.(.+)", r"model.vision_tower.\1"),
    (r"multi_modal_projector\.(.+)", r"model.multi_modal_projector.\1"),
    (r"((?:model\.|lm_head\.).+)", r"\1"),
]


def apply_renames(name: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in renames:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    return None


def plan_release_weights(
    checkpoint: SafetensorsCheckpoint, llm_architecture: str, text_config
) -> tuple[list[WeightJob], list[str]]:
    """Jobs mapping a release (`InternVLChatModel`) checkpoint onto native InternVL names; also the unknown keys."""
    jobs, unknown = [], []
    llm_renames = RELEASE_INTERNLM2_RENAMES if llm_architecture == "InternLM2ForCausalLM" else RELEASE_QWEN2_RENAMES
    for name in checkpoint.entries:
        if IGNORED_SOURCE_PATTERN.search(name):
            continue
        vit_qkv = re.fullmatch(_VIT + r"attn\.qkv\.(weight|bias)", name)
        wqkv = re.fullmatch(_LM2 + r"attention\.wqkv\.(weight|bias)", name)
        if vit_qkv:
            prefix = f"model.vision_tower.encoder.layer.{vit_qkv[1]}.attention."
            targets = [f"{prefix}{proj}.{vit_qkv[2]}" for proj in ("q_proj", "k_proj", "v_proj")]
            jobs.append(split_rows_job(checkpoint, name, targets))
        elif wqkv and llm_architecture == "InternLM2ForCausalLM":
            prefix = f"model.language_model.layers.{wqkv[1]}.self_attn."
            targets = [f"{prefix}{proj}.{wqkv[2]}" for proj in ("q_proj", "k_proj", "v_proj")]
            jobs.append(
                internlm2_wqkv_job(
                    checkpoint, name, targets, text_config.num_attention_heads, text_config.num_key_value_heads
                )
            )
        else:
            target = apply_renames(name, RELEASE_VISION_RENAMES + llm_renames)
            if target is None:
                unknown.append(name)
            else:
                jobs.append(rename_job(checkpoint, name, target))
    return jobs, unknown


def plan_native_weights(checkpoint: SafetensorsCheckpoint) -> tuple[list[WeightJob], list[str]]:
    """Jobs for a transformers-native (`InternVLForConditionalGeneration`) checkpoint: renames only."""
    jobs, unknown = [], []
    for name in checkpoint.entries:
        if IGNORED_SOURCE_PATTERN.search(name):
            continue
        target = apply_renames(name, NATIVE_LEGACY_RENAMES)
        if target is None:
            unknown.append(name)
        else:
            jobs.append(rename_job(checkpoint, name, target))
    return jobs, unknown


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def rope_parameters_from_release(llm_config: dict) -> dict:
    """Release `rope_theta` + `rope_scaling` ({"type": "dynamic", "factor": 2.0} in InternLM2.5) -> rope_parameters."""
    theta = float(llm_config.get("rope_theta", 10000.0))
    scaling = llm_config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if rope_type not in ("dynamic", "linear", "yarn", "llama3", "longrope", "default"):
        raise ConversionError(f"The LLM's rope_scaling type {rope_type!r} is not supported (dynamic, linear, yarn).")
    return {"rope_type": rope_type, "rope_theta": theta, **scaling}


def text_config_from_release(llm_config: dict) -> LlamaConfig | Qwen2Config:
    """The release `llm_config` as a transformers-native config: InternLM2 becomes Llama, Qwen2 stays Qwen2."""
    architecture = (llm_config.get("architectures") or [None])[0]
    common = {
        "vocab_size": llm_config["vocab_size"],
        "hidden_size": llm_config["hidden_size"],
        "intermediate_size": llm_config["intermediate_size"],
        "num_hidden_layers": llm_config["num_hidden_layers"],
        "num_attention_heads": llm_config["num_attention_heads"],
        "num_key_value_heads": llm_config.get("num_key_value_heads") or llm_config["num_attention_heads"],
        "hidden_act": llm_config.get("hidden_act", "silu"),
        "max_position_embeddings": llm_config.get("max_position_embeddings", 32768),
        "initializer_range": llm_config.get("initializer_range", 0.02),
        "rms_norm_eps": llm_config.get("rms_norm_eps", 1e-6),
        "rope_parameters": rope_parameters_from_release(llm_config),
        "bos_token_id": llm_config.get("bos_token_id"),
        "eos_token_id": llm_config.get("eos_token_id"),
        "pad_token_id": llm_config.get("pad_token_id"),
        "tie_word_embeddings": False,
    }
    if architecture == "InternLM2ForCausalLM":
        return LlamaConfig(
            **common,
            head_dim=llm_config["hidden_size"] // llm_config["num_attention_heads"],
            attention_bias=bool(llm_config.get("bias", False)),
            mlp_bias=False,
        )
    if architecture == "Qwen2ForCausalLM":
        num_layers = llm_config["num_hidden_layers"]
        return Qwen2Config(
            **common,
            use_sliding_window=bool(llm_config.get("use_sliding_window", False)),
            sliding_window=llm_config.get("sliding_window") or 4096,
            max_window_layers=min(llm_config.get("max_window_layers", num_layers), num_layers),
        )
    raise ConversionError(
        f"The LLM is {architecture}, which ARMOR does not support: InternVL2.5 uses {' or '.join(SUPPORTED_LLMS)} "
        "(2B/8B/26B: InternLM2.5, 1B/4B/38B/78B: Qwen2.5)."
    )


def vision_config_from_release(vision_config: dict, image_size: int) -> InternVLVisionConfig:
    """InternViT-300M (LayerNorm) or InternViT-6B (RMSNorm, qk-norm, no qkv bias) as `InternVLVisionConfig`.

    Missing flags take InternViT's own config defaults, which are InternViT-6B's (the releases write them all).
    """
    norm_type = vision_config.get("norm_type", "rms_norm")
    if norm_type not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"vision_config.norm_type {norm_type!r} is unknown (layer_norm or rms_norm).")
    eps = vision_config.get("layer_norm_eps", 1e-6)
    qk_norm = bool(vision_config.get("qk_normalization", True))
    if qk_norm and eps != 1e-6:
        # transformers' InternViT qk-norm always uses eps 1e-6; InternViT-6B's own uses layer_norm_eps (1e-6).
        raise ConversionError(f"vision_config: qk_normalization with layer_norm_eps {eps} is not supported (1e-6).")
    return InternVLVisionConfig(
        hidden_size=vision_config["hidden_size"],
        num_hidden_layers=vision_config["num_hidden_layers"],
        num_attention_heads=vision_config["num_attention_heads"],
        intermediate_size=vision_config["intermediate_size"],
        hidden_act=vision_config.get("hidden_act", "gelu"),
        layer_norm_eps=eps,
        norm_type=norm_type,
        use_qk_norm=qk_norm,
        attention_bias=bool(vision_config.get("qkv_bias", False)),
        image_size=image_size,
        patch_size=vision_config.get("patch_size", 14),
        num_channels=vision_config.get("num_channels", 3),
        initializer_range=vision_config.get("initializer_range", 0.02),
        # InternViT has no final norm after its encoder; `use_mean_pooling` turns transformers' one into Identity.
        use_mean_pooling=True,
    )


def read_added_token_ids(folder: Path) -> dict[str, int]:
    """Ids of added tokens from a tokenizer folder's tokenizer.json, tokenizer_config.json or added_tokens.json."""
    ids: dict[str, int] = {}
    if (folder / "tokenizer.json").is_file():
        for token in load_json(folder / "tokenizer.json", "a tokenizer").get("added_tokens", []):
            ids.setdefault(token["content"], token["id"])
    if (folder / "tokenizer_config.json").is_file():
        decoder = load_json(folder / "tokenizer_config.json", "a tokenizer").get("added_tokens_decoder", {})
        for token_id, token in decoder.items():
            ids.setdefault(token["content"], int(token_id))
    if (folder / "added_tokens.json").is_file():
        for content, token_id in load_json(folder / "added_tokens.json", "a tokenizer").items():
            ids.setdefault(content, token_id)
    return ids


def check_tokenizer_folder(folder: Path):
    """The files `convert_tokenizer` reads: tokenizer_config.json and a vocabulary (InternLM2's tokenizer.model, or
    Qwen2's tokenizer.json or vocab.json + merges.txt)."""

    def has(name: str) -> bool:
        return (folder / name).is_file()

    lacking = []
    if not (has("tokenizer.model") or has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        lacking.append("tokenizer.model, tokenizer.json or vocab.json + merges.txt")
    if not has("tokenizer_config.json"):
        lacking.append("tokenizer_config.json")
    if lacking:
        raise ConversionError(
            f"{folder} has no tokenizer (no {' and no '.join(lacking)}): pass the folder holding the InternVL2.5 "
            "tokenizer with --tokenizer PATH."
        )


def internvl_image_token_ids(tokenizer_folder: Path) -> dict[str, int]:
    """`<img>`, `</img>`, `<IMG_CONTEXT>` ids: the release config does not store them, its tokenizer does."""
    check_tokenizer_folder(tokenizer_folder)
    ids = read_added_token_ids(tokenizer_folder)
    missing = [token for token in ("<img>", "</img>", "<IMG_CONTEXT>") if token not in ids]
    if missing:
        raise ConversionError(
            f"No ids for {missing} in the tokenizer files of {tokenizer_folder}: the InternVL2.5 tokenizer adds "
            "<img>, </img> and <IMG_CONTEXT>. Pass the InternVL2.5 tokenizer folder with --tokenizer PATH."
        )
    return {token: ids[token] for token in ("<img>", "</img>", "<IMG_CONTEXT>")}


# ---------------------------------------------------------------------------------------------------------------------
# The source model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class InternVLSource:
    """An InternVL2.5 checkpoint, read as far as headers and configs: everything needed to plan the conversion."""

    folder: Path
    layout: str  # "release" or "native"
    internvl_fields: dict  # InternVLConfig fields (vision_config / text_config as config objects)
    token_ids: dict[str, int]
    checkpoint: SafetensorsCheckpoint
    jobs: list[WeightJob]
    description: str
    max_tiles: int = 12  # InternVL2.5's max_dynamic_patch: input images are cut into at most this many 448px tiles

    @property
    def text_config(self):
        return self.internvl_fields["text_config"]

    def internvl_config(self) -> InternVLConfig:
        return InternVLConfig(**self.internvl_fields)


def load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path.parent} has no {path.name}, so it is not {what}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}).") from error


def open_internvl(folder: Path, tokenizer_folder: Path | None = None) -> InternVLSource:
    """Read an InternVL2.5 folder (release or native layout), map its config and plan every weight."""
    config = load_json(folder / "config.json", "an InternVL2.5 checkpoint")
    model_type = config.get("model_type")
    tokenizer_folder = tokenizer_folder or folder
    if model_type == "internvl_chat":
        source = open_release_internvl(folder, config, tokenizer_folder)
    elif model_type == "internvl":
        source = open_native_internvl(folder, config, tokenizer_folder)
    else:
        raise ConversionError(
            f"{folder} holds a {model_type!r} model ({config.get('architectures')}), not InternVL2.5: pass an "
            "InternVL2.5 release folder (model_type 'internvl_chat', e.g. OpenGVLab/InternVL2_5-8B) or its "
            "transformers-native '-hf' export (model_type 'internvl')."
        )
    expected = expected_state_shapes(InternVLForConditionalGeneration, source.internvl_config())
    check_plan_against_model(source.jobs, source.checkpoint, expected)
    return source


def open_release_internvl(folder: Path, config: dict, tokenizer_folder: Path) -> InternVLSource:
    for key in ("llm_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise ConversionError(f"{folder}/config.json has no {key}: it is not an InternVL2.5 release config.")
    if config.get("use_backbone_lora") or config.get("use_llm_lora"):
        raise ConversionError(
            f"{folder} stores LoRA adapters (use_backbone_lora / use_llm_lora); merge them into the weights first."
        )
    if config.get("ps_version", "v1") != "v2":
        raise ConversionError(
            f"{folder} uses pixel-shuffle {config.get('ps_version', 'v1')!r}; InternVL2.5 and transformers use 'v2'."
        )
    vision = config["vision_config"]
    image_size = config.get("force_image_size") or vision["image_size"]
    if image_size != vision["image_size"]:
        raise ConversionError(
            f"force_image_size {image_size} differs from the ViT's image_size {vision['image_size']}: not supported."
        )
    llm_architecture = (config["llm_config"].get("architectures") or [None])[0]
    text_config = text_config_from_release(config["llm_config"])
    vision_config = vision_config_from_release(vision, image_size)
    downsample_ratio = config.get("downsample_ratio", 0.5)
    token_ids = internvl_image_token_ids(tokenizer_folder)
    patches = image_size // vision_config.patch_size[0]
    fields = {
        "vision_config": vision_config,
        "text_config": text_config,
        "image_token_id": token_ids["<IMG_CONTEXT>"],
        "image_seq_length": int(patches * downsample_ratio) ** 2,
        "downsample_ratio": downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    }
    checkpoint = SafetensorsCheckpoint(folder)
    jobs, unknown = plan_release_weights(checkpoint, llm_architecture, text_config)
    raise_on_unknown(folder, unknown)
    tied = untie_output_head(folder, config["llm_config"], checkpoint, jobs)
    vit = "InternViT-6B" if vision_config.use_qk_norm else "InternViT-300M"
    llm = "InternLM2" if llm_architecture == "InternLM2ForCausalLM" else "Qwen2"
    description = (
        f"InternVL2.5 release layout ({vit}-like ViT, {vision_config.num_hidden_layers} layers; {llm} LLM, "
        f"{text_config.num_hidden_layers} layers, hidden {text_config.hidden_size}, vocab {text_config.vocab_size})"
    )
    if tied:
        description += "; its output head is tied to the embeddings, so lm_head is written as an untied copy of them"
    max_tiles = config.get("max_dynamic_patch", 12) if config.get("dynamic_image_size", True) else 1
    return InternVLSource(folder, "release", fields, token_ids, checkpoint, jobs, description, max_tiles)


def open_native_internvl(folder: Path, config: dict, tokenizer_folder: Path) -> InternVLSource:
    text_type = (config.get("text_config") or {}).get("model_type", "qwen2")
    if text_type not in ("llama", "qwen2"):
        raise ConversionError(
            f"{folder}: the LLM is {text_type!r}, which ARMOR does not support: InternVL2.5's LLMs are Llama "
            "(converted from InternLM2) and Qwen2."
        )
    try:
        native = InternVLConfig(
            **{key: value for key, value in config.items() if key in InternVLConfig.__dataclass_fields__}
        )
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{folder}/config.json is not a valid InternVL config ({error}).") from error
    text_config = native.text_config
    if text_config.tie_word_embeddings:
        raise ConversionError(f"{folder}: the LLM ties its output head to its embeddings; InternVL2.5's is untied.")
    token_ids = internvl_image_token_ids(tokenizer_folder)
    if token_ids["<IMG_CONTEXT>"] != native.image_token_id:
        raise ConversionError(
            f"{folder}: config.image_token_id is {native.image_token_id} but the tokenizer's <IMG_CONTEXT> is "
            f"{token_ids['<IMG_CONTEXT>']}; pass the matching tokenizer with --tokenizer."
        )
    fields = {
        "vision_config": native.vision_config,
        "text_config": text_config,
        "image_token_id": native.image_token_id,
        "image_seq_length": native.image_seq_length,
        "downsample_ratio": native.downsample_ratio,
        "projector_hidden_act": native.projector_hidden_act,
        "vision_feature_layer": native.vision_feature_layer,
        "vision_feature_select_strategy": native.vision_feature_select_strategy,
        "tie_word_embeddings": False,
    }
    checkpoint = SafetensorsCheckpoint(folder)
    jobs, unknown = plan_native_weights(checkpoint)
    raise_on_unknown(folder, unknown)
    description = (
        f"InternVL transformers-native layout (ViT {native.vision_config.num_hidden_layers} layers; {text_type} LLM, "
        f"{text_config.num_hidden_layers} layers, hidden {text_config.hidden_size}, vocab {text_config.vocab_size})"
    )
    preprocessor_path = folder / "preprocessor_config.json"
    preprocessor = load_json(preprocessor_path, "a processor folder") if preprocessor_path.is_file() else {}
    max_tiles = preprocessor.get("max_patches", 12)
    return InternVLSource(folder, "native", fields, token_ids, checkpoint, jobs, description, max_tiles)


def untie_output_head(
    folder: Path, llm_config: dict, checkpoint: SafetensorsCheckpoint, jobs: list[WeightJob]
) -> bool:
    """
    A release whose LLM ties its output head to the embeddings (`tie_word_embeddings`, as in Qwen2.5's small models)
    stores no head; ARMOR's lm_head is untied, so it is added as a copy of the embeddings (same values, same logits).
    Returns whether it was. A head stored despite the tie is used as is (saved from tied weights, it equals them).
    """
    targets = {name for job in jobs for name in job.targets}
    if "lm_head.weight" in targets or "model.language_model.embed_tokens.weight" not in targets:
        return False  # nothing to copy, or nothing to copy from (reported with the other missing tensors)
    if not llm_config.get("tie_word_embeddings", False):
        raise ConversionError(
            f"{folder} stores no LLM output head (language_model.lm_head.weight or language_model.output.weight) and "
            "its llm_config does not tie it to the embeddings (tie_word_embeddings false): the checkpoint is "
            "incomplete; download it again."
        )
    jobs.append(rename_job(checkpoint, source_of(jobs, "model.language_model.embed_tokens.weight"), "lm_head.weight"))
    return True


def raise_on_unknown(folder: Path, unknown: list[str]):
    if unknown:
        raise ConversionError(
            f"{folder} holds {len(unknown)} tensors that are not part of InternVL2.5 (e.g. {unknown[:5]}); it is not "
            "an InternVL2.5 checkpoint or it was modified (merge LoRA weights, drop extra heads) before converting."
        )


def expected_state_shapes(model_class: type, config, skip_prefixes: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Names and shapes of a model's state dict, from a weightless (meta-device) instance."""
    with torch.device("meta"):
        model = model_class(config)
    return {
        name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if not name.startswith(skip_prefixes)
    }


def check_plan_against_model(jobs: list[WeightJob], checkpoint: SafetensorsCheckpoint, expected: dict[str, tuple]):
    """Every source tensor is read, and every model tensor is written exactly once, with the model's shape."""
    produced: dict[str, tuple] = {}
    consumed: set[str] = set()
    for job in jobs:
        consumed.update(job.sources)
        for name, shape in job.targets.items():
            if name in produced:
                raise ConversionError(f"Internal error: target tensor {name} is produced twice.")
            produced[name] = shape
    ignored = {name for name in checkpoint.entries if IGNORED_SOURCE_PATTERN.search(name)}
    unread = set(checkpoint.entries) - consumed - ignored
    if unread:
        raise ConversionError(f"Source tensors left unconverted: {sorted(unread)[:8]}.")
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    if missing:
        raise ConversionError(
            f"The checkpoint lacks {len(missing)} tensors the model needs (e.g. {missing[:5]}): it is incomplete, or "
            "its config.json describes a different model size."
        )
    if extra:
        raise ConversionError(
            f"The checkpoint has {len(extra)} tensors the model has no place for (e.g. {extra[:5]})."
        )
    wrong = [(name, produced[name], expected[name]) for name in expected if produced[name] != expected[name]]
    if wrong:
        name, got, want = wrong[0]
        raise ConversionError(
            f"{len(wrong)} tensors have the wrong shape for the config, e.g. {name}: {got} in the checkpoint, {want} "
            "expected: config.json and the weights describe different models."
        )


def iterate_weights(
    jobs: list[WeightJob], checkpoint: SafetensorsCheckpoint, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """
    Run the jobs in order, yielding `(target name, blocks of rows)`; consume each block iterator before the next
    item. `dtype` None keeps each source's dtype.
    """
    for job in jobs:
        target_dtype = dtype or job_dtype(job, checkpoint)
        if job.rows is not None:
            (name,) = job.targets
            yield name, (block.to(target_dtype).contiguous() for block in job.rows(checkpoint))
            continue
        tensors = job.build(checkpoint.read(job.sources))
        if len(tensors) != len(job.targets):
            raise ConversionError(f"Internal error: a job built {len(tensors)} tensors for {list(job.targets)}.")
        for name, tensor in zip(job.targets, tensors):
            yield name, iter([tensor.to(target_dtype).contiguous()])


def job_dtype(job: WeightJob, checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    if job.dtype is not None:
        return job.dtype
    return checkpoint.entries[job.sources[0]].dtype


# ---------------------------------------------------------------------------------------------------------------------
# ARMOR's new parameters
# ---------------------------------------------------------------------------------------------------------------------


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor name: new weights do not depend on the order or sharding they are written in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def source_of(jobs: list[WeightJob], target: str) -> str:
    """The source tensor a renamed target comes from (embeddings and output head, for the mean initialisations)."""
    for job in jobs:
        if target in job.targets and len(job.sources) == 1 and len(job.targets) == 1:
            return job.sources[0]
    raise ConversionError(f"Internal error: no renamed source tensor for {target}.")


def row_mean_and_spread(blocks: Iterator[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Mean row of a (V, H) table given in row blocks and the rows' RMS distance to it per dimension (float64 sums)."""
    total = total_sq = None
    count = 0
    for block in blocks:
        block = block.float()
        block_sum, block_sq = block.sum(0).double(), block.square().sum(0).double()
        total = block_sum if total is None else total + block_sum
        total_sq = block_sq if total_sq is None else total_sq + block_sq
        count += block.shape[0]
    mean = total / count
    variance = (total_sq / count - mean * mean).clamp(min=0)
    return mean.float(), float(variance.mean().sqrt())


def normal_rows(shape: tuple, std: float, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """N(0, std) rows, drawn block by block from one generator (fixed block size, so the values are reproducible)."""
    rows = max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        yield torch.empty((min(rows, shape[0] - start), *shape[1:])).normal_(0.0, std, generator=generator)


def image_token_embeddings_job(embed_source: str, name: str, shape: tuple, seed: int, dtype: torch.dtype) -> WeightJob:
    """`<imgbos>`, `<imgend>`, `<imgpad>` and the codes start at the mean base embedding plus noise of 0.1x the
    rows' spread: in-distribution for the LLM (an "average token") yet distinct from one another."""

    def rows(reader: SafetensorsCheckpoint) -> Iterator[torch.Tensor]:
        mean, spread = row_mean_and_spread(reader.read_rows(embed_source, CHUNK_BYTES))
        for noise in normal_rows(shape, 0.1 * spread, tensor_generator(seed, name)):
            yield mean + noise

    return WeightJob((embed_source,), {name: shape}, rows=rows, dtype=dtype)


def imgbos_head_job(lm_head_source: str, name: str, shape: tuple, dtype: torch.dtype) -> WeightJob:
    """The `<imgbos>` row is the mean of the LLM's output rows. It scores the adapter's output, so `<imgbos>` starts at
    the average text logit of that state; a random adapter barely changes the LLM's last hidden state, so that is near
    the base's average text logit, below the best one, and greedy decoding is the base model's until trained. A
    copied adapter (`--adapter-init copy-top`) changes the state more, but its score stays below the best text logit
    too (both checked by the tests)."""

    def rows(reader: SafetensorsCheckpoint) -> Iterator[torch.Tensor]:
        yield row_mean_and_spread(reader.read_rows(lm_head_source, CHUNK_BYTES))[0].unsqueeze(0)

    return WeightJob((lm_head_source,), {name: shape}, rows=rows, dtype=dtype)


def random_job(name: str, shape: tuple, seed: int, dtype: torch.dtype, std: float) -> WeightJob:
    """A fresh weight as the LLM's `_init_weights` makes it: Linear N(0, initializer_range), biases 0, norms 1."""
    if name.endswith("norm.weight"):
        return WeightJob((), {name: shape}, rows=lambda _: iter([torch.ones(shape)]), dtype=dtype)
    if name.endswith(".bias"):
        return WeightJob((), {name: shape}, rows=lambda _: iter([torch.zeros(shape)]), dtype=dtype)
    if len(shape) != 2:
        raise ConversionError(f"Internal error: no initialisation rule for {name} {shape}.")
    return WeightJob(
        (), {name: shape}, rows=lambda _: normal_rows(shape, std, tensor_generator(seed, name)), dtype=dtype
    )


def copy_top_jobs(jobs: list[WeightJob], num_llm_layers: int, num_adapter_layers: int) -> list[WeightJob]:
    """Adapter layer i (and its norm) as a copy of LLM layer L - N + i (and the LLM's final norm)."""
    first = num_llm_layers - num_adapter_layers
    layer_pattern = re.compile(r"model\.language_model\.layers\.(\d+)\.(.+)")

    def adapter_name(name: str) -> str | None:
        if name == "model.language_model.norm.weight":
            return "adapter.norm.weight"
        match = layer_pattern.fullmatch(name)
        if match and int(match[1]) >= first:
            return f"adapter.layers.{int(match[1]) - first}.{match[2]}"
        return None

    copies = []
    for job in jobs:
        names = [adapter_name(name) for name in job.targets]
        if any(name is not None for name in names):
            if not all(names):
                raise ConversionError(
                    f"Internal error: a job mixes adapter and non-adapter targets: {list(job.targets)}."
                )
            targets = dict(zip(names, job.targets.values()))
            copies.append(WeightJob(job.sources, targets, job.build, job.rows, job.dtype))
    return copies


# ---------------------------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 1000000000.")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(match[1]) * units[(match[2] or "").upper()])


def split_into_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in writing order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class StreamingSafetensorsWriter:
    """
    Writes tensors announced up front (names, shapes, dtypes, order) into safetensors shards as they arrive. Each
    shard's header is written first, then the data of each tensor in order, so no more than the tensor being written
    is ever held in memory. The files are standard safetensors, plus `model.safetensors.index.json` when sharded.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.folder = folder
        self.shards = split_into_shards(specs, max_shard_bytes)
        count = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{index + 1:05d}-of-{count:05d}.safetensors" for index in range(count)]
        )
        self.order = [(shard_index, spec) for shard_index, shard in enumerate(self.shards) for spec in shard]
        self.position = 0
        self.handle = None
        self.open_shard = -1

    def _start_shard(self, shard_index: int):
        if self.handle is not None:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for spec in self.shards[shard_index]:
            header[spec.name] = {
                "dtype": SAFETENSORS_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.handle = open(self.folder / self.file_names[shard_index], "wb")
        self.handle.write(struct.pack("<Q", len(encoded)))
        self.handle.write(encoded)
        self.open_shard = shard_index

    def write(self, name: str, blocks: Iterator[torch.Tensor] | torch.Tensor):
        """Append the next planned tensor, given whole or as consecutive blocks of rows."""
        if self.position >= len(self.order):
            raise ConversionError(f"Internal error: {name} is one tensor more than planned.")
        shard_index, spec = self.order[self.position]
        if name != spec.name:
            raise ConversionError(f"Internal error: got {name}, planned {spec.name} next.")
        if shard_index != self.open_shard:
            self._start_shard(shard_index)
        rows = 0
        for block in [blocks] if isinstance(blocks, torch.Tensor) else blocks:
            if (
                block.dtype != spec.dtype
                or tuple(block.shape[1:]) != spec.shape[1:]
                or (not spec.shape and block.ndim)
            ):
                raise ConversionError(
                    f"Internal error: {name} block {tuple(block.shape)} {block.dtype}, planned {spec.shape} "
                    f"{spec.dtype}."
                )
            rows += block.shape[0] if spec.shape else 1
            data = block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.handle.write(memoryview(data))
        if rows != (spec.shape[0] if spec.shape else 1):
            raise ConversionError(f"Internal error: {name} got {rows} rows, planned {spec.shape}.")
        self.position += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index when sharded, and return the weight map."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.position != len(self.order):
            missing = [spec.name for _, spec in self.order[self.position :]]
            raise ConversionError(
                f"Internal error: {len(missing)} planned tensors were not written, e.g. {missing[:3]}."
            )
        weight_map = {spec.name: self.file_names[index] for index, spec in self.order}
        if len(self.shards) > 1:
            total_size = sum(spec.nbytes for _, spec in self.order)
            total_parameters = sum(math.prod(spec.shape) for _, spec in self.order)
            index = {
                "metadata": {"total_size": total_size, "total_parameters": total_parameters},
                "weight_map": weight_map,
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


def verify_written(folder: Path, specs: list[TensorSpec]):
    """Re-read the written headers: every planned tensor is there once, with its shape and dtype, and nothing else."""
    written = SafetensorsCheckpoint(folder).entries
    planned = {spec.name: spec for spec in specs}
    if set(written) != set(planned):
        raise ConversionError(
            f"Internal error: written tensors differ from the plan (missing {sorted(set(planned) - set(written))[:3]},"
            " "
            f"extra {sorted(set(written) - set(planned))[:3]})."
        )
    for name, entry in written.items():
        if entry.shape != planned[name].shape or entry.dtype != planned[name].dtype:
            raise ConversionError(f"Internal error: {name} was written as {entry.shape} {entry.dtype}.")


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: Hub repo ids, the VQGAN, the tokenizer
# ---------------------------------------------------------------------------------------------------------------------

REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(spec: str | os.PathLike, option: str) -> Path:
    """A local path as is; a Hub repo id (`owner/name`) downloaded with `snapshot_download`."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    text = str(spec)
    if not REPO_ID_PATTERN.fullmatch(text) or text.startswith((".", "/", "~")):
        raise ConversionError(f"{option} {text}: no such file or folder.")
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise ConversionError(
            f"{option} {text}: not a local folder, and the Hub cannot be reached in offline mode (HF_HUB_OFFLINE). "
            "Download the repository elsewhere and pass its local folder instead."
        )
    try:
        return Path(snapshot_download(text, ignore_patterns=["*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx"]))
    except Exception as error:  # network errors, missing repos, gated repos: all mean "use a local folder"
        raise ConversionError(
            f"{option} {text}: not a local folder, and downloading it from the Hub failed "
            f"({type(error).__name__}: {error}). Without network access, download it elsewhere and pass its local "
            "folder."
        ) from error


def load_vqgan(path: Path):
    """Chameleon's `vqgan.yaml` + `vqgan.ckpt` (a folder holding both, or the .ckpt path), or a VQGAN folder of ours
    (`config.json` of model_type `armor_vqgan` + safetensors), or an ARMOR checkpoint (its `vqgan/` folder)."""
    from armor.modeling_vqgan import ArmorVQGANModel

    if path.is_file():
        if path.suffix != ".ckpt":
            raise ConversionError(
                f"--vqgan {path}: pass Chameleon's vqgan.ckpt (with vqgan.yaml beside it) or a folder."
            )
        yaml_files = [path.with_suffix(".yaml")] + sorted(path.parent.glob("*.yaml"))
        yaml_path = next((candidate for candidate in yaml_files if candidate.is_file()), None)
        if yaml_path is None:
            raise ConversionError(
                f"--vqgan {path}: no vqgan.yaml next to the checkpoint; put Chameleon's vqgan.yaml there."
            )
        return load_chameleon_vqgan(ArmorVQGANModel, yaml_path, path)
    if (path / "vqgan.ckpt").is_file() or (path / "vqgan.yaml").is_file():
        return load_chameleon_vqgan(ArmorVQGANModel, path / "vqgan.yaml", path / "vqgan.ckpt")
    if not (path / "config.json").is_file() and (path / "vqgan" / "config.json").is_file():
        path = path / "vqgan"
    if (path / "config.json").is_file():
        return load_armor_vqgan(ArmorVQGANModel, path)
    raise ConversionError(
        f"--vqgan {path}: found neither Chameleon's vqgan.yaml + vqgan.ckpt nor a VQGAN folder (config.json + "
        "model.safetensors). Pass Chameleon's tokenizer/ folder or a vqgan/ folder written by this converter."
    )


def load_chameleon_vqgan(model_class: type, yaml_path: Path, checkpoint_path: Path):
    try:
        model = model_class.from_chameleon(yaml_path, checkpoint_path)
    except (ValueError, OSError, ImportError) as error:
        raise ConversionError(f"--vqgan: {error}") from error
    return model, f"Chameleon's VQGAN (`{checkpoint_path.name}` + `{yaml_path.name}`)"


def load_armor_vqgan(model_class: type, folder: Path):
    """Our VQGAN folder, after checking its config.json describes exactly the weights it sits beside."""
    values = load_json(folder / "config.json", "a VQGAN folder")
    if values.get("model_type") != ArmorVQGANConfig.model_type:
        raise ConversionError(
            f"--vqgan {folder}: config.json is a {values.get('model_type')!r} model, not an ARMOR VQGAN "
            f"({ArmorVQGANConfig.model_type!r})."
        )
    try:
        config = ArmorVQGANConfig.from_pretrained(folder)
    except ValueError as error:
        raise ConversionError(f"--vqgan {folder}: invalid config.json ({error}).") from error
    stored = {name: entry.shape for name, entry in SafetensorsCheckpoint(folder).entries.items()}
    expected = expected_state_shapes(model_class, config)
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        wrong = sorted(
            f"{n}: {stored[n]} vs {expected[n]}" for n in set(stored) & set(expected) if stored[n] != expected[n]
        )
        raise ConversionError(
            f"--vqgan {folder}: config.json disagrees with the weights (missing {missing[:3]}, unexpected {extra[:3]},"
            " "
            f"shape mismatches {wrong[:3]}). The config was edited or belongs to other weights; write the folder "
            "again from Chameleon's vqgan.yaml + vqgan.ckpt."
        )
    model = model_class.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), f"Chameleon's VQGAN (ARMOR VQGAN folder `{folder.name}`)"


def build_tokenizer(source: InternVLSource, tokenizer_folder: Path | None, config: ArmorConfig):
    """The InternVL2.5 tokenizer with `<imgbos>`, `<imgend>`, `<imgpad>` at V, V+1, V+2, checked against the model."""
    from armor.convert_tokenizer import check_special_token_ids, convert_tokenizer

    folder = tokenizer_folder or source.folder
    vocab_size = config.text_config.vocab_size
    try:
        tokenizer = convert_tokenizer(folder, vocab_size)
    except ValueError as error:
        raise ConversionError(f"The tokenizer in {folder} does not fit the model: {error}") from error
    except Exception as error:  # unreadable or damaged files: a parser's own exception, whatever its type
        raise ConversionError(
            f"The tokenizer in {folder} could not be read ({type(error).__name__}: {error}); download its files "
            "again or pass the InternVL2.5 tokenizer folder with --tokenizer PATH."
        ) from error
    expected = {
        "<imgbos>": config.imgbos_token_id,
        "<imgend>": config.imgend_token_id,
        "<imgpad>": config.imgpad_token_id,
        "<img>": config.image_start_token_id,
        "</img>": config.image_end_token_id,
        "<IMG_CONTEXT>": config.image_token_id,
    }
    try:
        check_special_token_ids(tokenizer, expected)
    except ValueError as error:
        raise ConversionError(
            f"The tokenizer in {folder} disagrees with the model ({error}); pass the tokenizer released with the "
            "InternVL2.5 checkpoint (--tokenizer PATH)."
        ) from error
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# The ARMOR checkpoint: config, weights plan, generation defaults, model card
# ---------------------------------------------------------------------------------------------------------------------


def build_processor(source: InternVLSource, config: ArmorConfig, tokenizer):
    """`ArmorProcessor`: InternVL2.5's tiling image processor and prompt format, with the converted tokenizer."""
    from armor.processing_armor import ArmorProcessor, internvl_image_processor

    try:
        return ArmorProcessor(
            image_processor=internvl_image_processor(max_tiles=source.max_tiles),
            tokenizer=tokenizer,
            image_seq_length=config.image_seq_length,
            num_image_codes=config.num_image_codes,
        )
    except (TypeError, ValueError) as error:
        raise ConversionError(f"The processor could not be built: {error}") from error


def build_armor_config(
    source: InternVLSource, vqgan_config: ArmorVQGANConfig, adapter_layers: int, image_size: int, dtype: torch.dtype
) -> ArmorConfig:
    factor = vqgan_config.downsample_factor
    if image_size % factor:
        raise ConversionError(
            f"--image-size {image_size} is not a multiple of the VQGAN's downsampling factor {factor}."
        )
    if adapter_layers < 1:
        raise ConversionError(f"--adapter-layers must be at least 1, got {adapter_layers}.")
    grid = image_size // factor
    try:
        config = ArmorConfig(
            **source.internvl_fields,
            image_start_token_id=source.token_ids["<img>"],
            image_end_token_id=source.token_ids["</img>"],
            vqgan_config=vqgan_config,
            num_adapter_layers=adapter_layers,
            image_codebook_size=vqgan_config.num_embeddings,
            num_image_codes=grid * grid,
        )
        config.validate_armor()
    except ValueError as error:
        raise ConversionError(f"The ARMOR config is invalid: {error}") from error
    config.architectures = ["ArmorForConditionalGeneration"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    config.text_config.dtype = dtype
    config.vision_config.dtype = dtype
    return config


def plan_armor_weights(
    source: InternVLSource, config: ArmorConfig, expected: dict[str, tuple], adapter_init: str, seed: int
) -> list[WeightJob]:
    """The InternVL jobs, then ARMOR's new tensors: image-token embeddings, `<imgbos>` row, adapter, visual head."""
    text_config = config.text_config
    embed_source = source_of(source.jobs, "model.language_model.embed_tokens.weight")
    lm_head_source = source_of(source.jobs, "lm_head.weight")
    dtype = source.checkpoint.entries[embed_source].dtype
    std = text_config.initializer_range
    jobs = list(source.jobs)
    name = "image_token_embeddings.weight"
    jobs.append(image_token_embeddings_job(embed_source, name, expected[name], seed, dtype))
    jobs.append(imgbos_head_job(lm_head_source, "imgbos_head.weight", expected["imgbos_head.weight"], dtype))
    if adapter_init == "copy-top":
        if config.num_adapter_layers > text_config.num_hidden_layers:
            raise ConversionError(
                f"--adapter-init copy-top needs at most {text_config.num_hidden_layers} adapter layers (the LLM's "
                f"layer count), got --adapter-layers {config.num_adapter_layers}."
            )
        jobs.extend(copy_top_jobs(source.jobs, text_config.num_hidden_layers, config.num_adapter_layers))
    else:
        adapter_names = [name for name in expected if name.startswith("adapter.")]
        jobs.extend(random_job(name, expected[name], seed, dtype, std) for name in adapter_names)
    jobs.append(random_job("visual_head.weight", expected["visual_head.weight"], seed, dtype, std))
    return jobs


def build_generation_config(config: ArmorConfig, tokenizer, options: dict):
    """Text defaults as InternVL2.5's chat (greedy, stop at `<|im_end|>`), image defaults for sampling codes."""
    from transformers import GenerationConfig

    text_config = config.text_config
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    eos_token_id = end_of_turn if end_of_turn is not None else text_config.eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    return GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        max_new_tokens=config.num_image_codes + 512,
        do_sample=False,
        modality="auto",
        guidance_scale=options["guidance_scale"],
        image_do_sample=True,
        image_temperature=options["image_temperature"],
        image_top_k=options["image_top_k"],
        image_top_p=1.0,
    )


def count_parameters(specs: list[TensorSpec], prefix: str) -> int:
    return sum(math.prod(spec.shape) for spec in specs if spec.name.startswith(prefix))


def model_card(
    source: InternVLSource,
    source_name: str,
    vqgan_description: str,
    vqgan_parameters: int,
    config: ArmorConfig,
    specs: list[TensorSpec],
    options: dict,
) -> str:
    """README.md: where the weights come from, what was added (and how it was initialised), how to use it."""
    parts = [
        ("vision tower (InternViT)", count_parameters(specs, "model.vision_tower.")),
        ("projector (pixel-shuffle MLP)", count_parameters(specs, "model.multi_modal_projector.")),
        ("LLM", count_parameters(specs, "model.language_model.")),
        ("LLM output head (`lm_head`)", count_parameters(specs, "lm_head.")),
    ]
    added = [
        ("`image_token_embeddings` (3 specials + codes)", count_parameters(specs, "image_token_embeddings.")),
        ("`imgbos_head`", count_parameters(specs, "imgbos_head.")),
        (f"`adapter` ({config.num_adapter_layers} decoder layers + norm)", count_parameters(specs, "adapter.")),
        ("`visual_head` (`<imgend>`, `<imgpad>`, codes)", count_parameters(specs, "visual_head.")),
    ]
    base_total, added_total = sum(n for _, n in parts), sum(n for _, n in added)
    adapter_init = (
        f"copies of the LLM's top {config.num_adapter_layers} layers and its final norm"
        if options["adapter_init"] == "copy-top"
        else f"random, N(0, {config.text_config.initializer_range}) linear weights, unit norms, zero biases"
    )
    vocab, codes = config.text_config.vocab_size, config.image_codebook_size
    rows = "\n".join(f"| {name} | {count:,} |" for name, count in parts + [("**base total**", base_total)])
    added_rows = "\n".join(f"| {name} | {count:,} |" for name, count in added + [("**added total**", added_total)])
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- armor
- internvl
- multimodal
- image-generation
---

# ARMOR checkpoint converted from `{source_name}`

[ARMOR](https://arxiv.org/abs/2503.06542) turns an understanding-only multimodal LLM into one that can also answer
with images. This checkpoint holds **untrained** ARMOR parts on top of the base model, i.e. the starting point for
ARMOR's training; the base model's text answers are unchanged (the first V = {vocab:,} text logits are exactly the base
model's, and the `<imgbos>` score, which reads the adapter's output, starts near the average text logit).

* Base model: `{source_name}` - {source.description}.
* VQGAN: {vqgan_description}; {codes:,} codes, {config.vqgan_config.downsample_factor}x downsampling,
  {vqgan_parameters:,} parameters in `vqgan/` (float32).
* Generated images: {config.generated_image_size}x{config.generated_image_size} px = {config.num_image_codes} codes
  ({config.image_grid_size}x{config.image_grid_size}).
* Token ids: text `[0, {vocab})`, `<imgbos>` {config.imgbos_token_id}, `<imgend>` {config.imgend_token_id},
  `<imgpad>` {config.imgpad_token_id}, image code c = {config.image_code_offset} + c.
* Weights dtype: {str(config.dtype).replace("torch.", "")}. Converted with `convert_checkpoint.py`
  (seed {options["seed"]}).

## Parameters

| base part | parameters |
| --- | ---: |
{rows}

| added by ARMOR | parameters |
| --- | ---: |
{added_rows}

Initialisation of the added parts:
* `image_token_embeddings`: mean of the base embedding rows + Gaussian noise (0.1x the rows' spread around the mean).
* `imgbos_head`: mean of the `lm_head` rows; it scores `<imgbos>` from the adapter's output.
* `adapter`: {adapter_init}.
* `visual_head`: N(0, {config.text_config.initializer_range}).

## Usage

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{options["usage_path"]}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{options["usage_path"]}", trust_remote_code=True)
messages = [{{"role": "user", "content": "<image>\\nDescribe this picture, then draw it in winter."}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open("photo.jpg"))
answer = model.generate(**inputs)  # modality="image" asks for an image answer
for segment in processor.decode(answer[0, inputs["input_ids"].shape[1] :]):
    if isinstance(segment, str):
        print(segment)
    else:
        segment.save("answer.png")
```

`model.generate` answers with text and images (see its docstring); `generation_config.json` sets the image sampling
defaults: `guidance_scale` {options["guidance_scale"]}, `image_top_k` {options["image_top_k"]}, `image_temperature`
{options["image_temperature"]}.

## Layout

`config.json` (with `auto_map`), `generation_config.json`, safetensors weights, the code files
({", ".join(f"`{name}`" for name in CODE_FILES)}), `processor_config.json`, `preprocessor_config.json`,
`tokenizer/`, `vqgan/`.
"""


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def check_output_folder(output: Path, overwrite: bool, inputs: list[Path]):
    """Refuse to clobber anything: an existing non-empty folder needs --overwrite, and never an input folder."""
    for path in inputs:
        if output == path or output in path.parents or path in output.parents:
            raise ConversionError(f"--output {output} overlaps the input {path}; write the checkpoint somewhere else.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} exists and is a file; choose a folder path.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output {output} already exists and is not empty; pass --overwrite to replace it or choose another "
            "folder."
        )


def publish_folder(staging: Path, output: Path):
    """Move the finished staging folder into place in one rename; an old output is removed only after that."""
    if output.exists() and any(output.iterdir()):
        trash = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        os.replace(output, trash)
        try:
            os.replace(staging, output)
        except OSError:
            os.replace(trash, output)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if output.exists():
            output.rmdir()
        os.replace(staging, output)


def push_folder_to_hub(folder: Path, repo_id: str, private: bool, source_name: str) -> str:
    """Create (or reuse) the Hub repository and upload the whole checkpoint folder in one commit."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=f"ARMOR checkpoint converted from {source_name}"
        )
    except Exception as error:  # network, authentication, permissions
        raise ConversionError(
            f"Uploading to {repo_id} failed ({type(error).__name__}: {error}). The checkpoint is complete in "
            f"{folder}; "
            f"log in (`hf auth login`) and upload it with `hf upload {repo_id} {folder}`."
        ) from error
    return f"https://huggingface.co/{repo_id}"


def convert(
    internvl: str,
    vqgan: str,
    output: str | os.PathLike,
    tokenizer: str | None = None,
    adapter_layers: int = 4,
    dtype: str = "keep",
    image_size: int = 512,
    adapter_init: str = "random",
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    guidance_scale: float = 3.0,
    image_top_k: int = 2000,
    image_temperature: float = 1.0,
    push_to_hub: str | None = None,
    private: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert InternVL2.5 + a VQGAN into an ARMOR checkpoint folder at `output`; returns its path."""
    started = time.perf_counter()
    if dtype not in ("keep", *DTYPES):
        raise ConversionError(f"--dtype {dtype!r}: choose keep, bfloat16, float16 or float32.")
    if adapter_init not in ("random", "copy-top"):
        raise ConversionError(f"--adapter-init {adapter_init!r}: choose random or copy-top.")
    if push_to_hub is not None and not REPO_ID_PATTERN.fullmatch(push_to_hub):
        raise ConversionError(f"--push-to-hub {push_to_hub!r} is not a repo id; write it as owner/name.")
    max_shard_bytes = parse_size(max_shard_size)
    missing_code = [name for name in CODE_FILES if not (REPO_ROOT / name).is_file()]
    if missing_code:
        raise ConversionError(f"The model code files {missing_code} are missing beside {Path(__file__).name}.")
    output = Path(output).expanduser().resolve()
    check_output_folder(output, overwrite, [])

    internvl_folder = resolve_source(internvl, "--internvl")
    vqgan_path = resolve_source(vqgan, "--vqgan")
    tokenizer_folder = resolve_source(tokenizer, "--tokenizer") if tokenizer else None
    inputs = [internvl_folder, vqgan_path] + ([tokenizer_folder] if tokenizer_folder else [])
    check_output_folder(output, overwrite, inputs)
    source = open_internvl(internvl_folder, tokenizer_folder)
    log(f"source: {source.description}")
    vqgan_model, vqgan_description = load_vqgan(vqgan_path)
    log(f"vqgan: {vqgan_description}")

    embed_dtype = source.checkpoint.entries[source_of(source.jobs, "model.language_model.embed_tokens.weight")].dtype
    target_dtype = None if dtype == "keep" else DTYPES[dtype]
    config = build_armor_config(source, vqgan_model.config, adapter_layers, image_size, target_dtype or embed_dtype)
    tokenizer_object = build_tokenizer(source, tokenizer_folder, config)
    processor = build_processor(source, config, tokenizer_object)
    options = {
        "adapter_init": adapter_init,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "image_top_k": image_top_k,
        "image_temperature": image_temperature,
    }
    generation_config = build_generation_config(config, tokenizer_object, options)

    from armor.modeling_armor import ArmorForConditionalGeneration

    expected = expected_state_shapes(ArmorForConditionalGeneration, config, skip_prefixes=("vqgan.", "model.vqgan."))
    jobs = plan_armor_weights(source, config, expected, adapter_init, seed)
    check_plan_against_model(jobs, source.checkpoint, expected)
    specs = [
        TensorSpec(name, shape, target_dtype or job_dtype(job, source.checkpoint))
        for job in jobs
        for name, shape in job.targets.items()
    ]

    source_name = internvl_folder.name if Path(internvl).expanduser().exists() else str(internvl)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    writer = StreamingSafetensorsWriter(staging, specs, max_shard_bytes)  # opens no file until the first write
    try:
        for name, blocks in iterate_weights(jobs, source.checkpoint, target_dtype):
            writer.write(name, blocks)
        writer.close()
        verify_written(staging, specs)
        config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        vqgan_model.save_pretrained(staging / "vqgan")
        processor.save_pretrained(staging)
        for file_name in CODE_FILES:
            shutil.copy2(REPO_ROOT / file_name, staging / file_name)
        vqgan_parameters = sum(parameter.numel() for parameter in vqgan_model.parameters())
        options["usage_path"] = push_to_hub or f"path/to/{output.name}"
        card = model_card(source, source_name, vqgan_description, vqgan_parameters, config, specs, options)
        (staging / "README.md").write_text(card)
        publish_folder(staging, output)
    except BaseException:
        if writer.handle is not None:  # the shard being written when the failure hit
            writer.handle.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    added = sum(math.prod(spec.shape) for spec in specs if not spec.name.startswith(("model.", "lm_head.")))
    log(
        f"wrote {output}: {len(specs)} tensors in {len(writer.file_names)} shard(s), {added:,} new parameters, "
        f"{time.perf_counter() - started:.1f}s"
    )
    if push_to_hub:
        log(f"pushed to {push_folder_to_hub(output, push_to_hub, private, source_name)}")
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Convert an InternVL2.5 checkpoint and Chameleon's VQGAN into an ARMOR checkpoint folder that loads with
AutoModel / AutoProcessor.from_pretrained(..., trust_remote_code=True).

Inputs: every InternVL2.5 size in the release layout (InternLM2.5-based 2B/8B/26B, Qwen2.5-based 1B/4B/38B/78B;
InternViT-300M and InternViT-6B) and the transformers-native "-hf" layout. Weights stream in blocks of rows from the
source shards into the output shards, so memory stays bounded whatever the model size.
"""

EPILOG = """\
What is added, and how it starts (all of it is meant to be trained; the base model's answers do not change):
  image_token_embeddings  [3 + K, H]  mean of the LLM's embedding rows + noise of 0.1x their spread: new tokens
                                      start as an "average token" the LLM already handles, yet distinct.
  imgbos_head             [1, H]      mean of the lm_head rows, applied to the adapter's output: <imgbos> starts
                                      near the average text logit, below the best, so greedy text decoding is the
                                      base model's until trained.
  adapter                 N layers    see --adapter-init.
  visual_head             [K + 2, H]  N(0, initializer_range), as the LLM's own _init_weights.

Safety: the checkpoint is written into a hidden sibling folder and moved into place only when complete, so a
failure leaves no output behind; every source tensor must be consumed and every model tensor written with the
model's shape and dtype.

Examples:
  python convert_checkpoint.py --internvl OpenGVLab/InternVL2_5-8B --vqgan chameleon/tokenizer --output armor-8b
  python convert_checkpoint.py --internvl ./InternVL2_5-1B --vqgan ./armor-8b/vqgan --dtype bfloat16 \\
      --adapter-init copy-top --output armor-1b --push-to-hub me/armor-1b --private
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--internvl",
        required=True,
        metavar="PATH_OR_REPO",
        help="InternVL2.5 folder or Hub repo id, release layout (config.json model_type 'internvl_chat') or the "
        "transformers-native '-hf' layout (model_type 'internvl'). A repo id is downloaded with snapshot_download; "
        "offline, pass a local folder.",
    )
    inputs.add_argument(
        "--vqgan",
        required=True,
        metavar="PATH",
        help="Chameleon's VQGAN: a folder with vqgan.yaml + vqgan.ckpt (read with weights_only=True) or the .ckpt "
        "path; or a VQGAN folder written by this converter (config.json + model.safetensors, or an ARMOR "
        "checkpoint whose vqgan/ is used).",
    )
    inputs.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="Tokenizer folder of the InternVL2.5 checkpoint, when it is not inside --internvl (e.g. an -hf export "
        "without tokenizer files). It is converted to a transformers-native tokenizer with <imgbos>, <imgend>, "
        "<imgpad> at ids V, V+1, V+2, and checked against the model's ids.",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--adapter-layers",
        type=int,
        default=4,
        metavar="N",
        help="Decoder layers (the LLM's own layer class) between the LLM's last hidden state and the visual head "
        "(default: 4).",
    )
    model.add_argument(
        "--adapter-init",
        choices=("random", "copy-top"),
        default="random",
        help="random (default; the paper's setting): as the LLM's own _init_weights, N(0, initializer_range) "
        "linear weights, unit norms, zero biases. copy-top: adapter layer i = LLM layer "
        "L-N+i and the adapter norm = the LLM's final norm: pretrained attention and MLP circuits that already read "
        "this LLM's hidden features, so training starts from working feature transforms instead of noise (a warm "
        "start, not an exact continuation: their input is the LLM's final state, not layer L-N's). Needs N <= L.",
    )
    model.add_argument(
        "--image-size",
        type=int,
        choices=(512, 256),
        default=512,
        help="Side of generated images in pixels; num_image_codes = (size / VQGAN downsampling)^2: 1024 codes at "
        "512 (default), 256 at 256 with Chameleon's 16x VQGAN.",
    )
    model.add_argument(
        "--dtype",
        choices=("keep", "bfloat16", "float16", "float32"),
        default="keep",
        help="Dtype of the written weights; keep (default) keeps each source tensor's dtype (bfloat16 in the "
        "releases) and gives new tensors the embeddings' dtype. The VQGAN stays float32.",
    )
    model.add_argument(
        "--seed", type=int, default=0, help="Seed of the new weights (one generator per tensor name; default: 0)."
    )
    generation = parser.add_argument_group("generation defaults (written to generation_config.json)")
    generation.add_argument(
        "--guidance-scale",
        type=float,
        default=3.0,
        help="Classifier-free guidance of image tokens (1 = off; default: 3.0).",
    )
    generation.add_argument(
        "--image-top-k", type=int, default=2000, help="Top-k for image codes (0 = off; default: 2000)."
    )
    generation.add_argument(
        "--image-temperature", type=float, default=1.0, help="Sampling temperature for image codes (default: 1.0)."
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR", help="Folder to write the ARMOR checkpoint into.")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a non-empty --output folder (the old one is removed only after the new one is complete).",
    )
    out.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="Largest safetensors shard, e.g. 5GB (default), 500MB; one model.safetensors when everything fits.",
    )
    out.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="After writing, create the Hub repository (exist_ok) and upload the folder in one commit.",
    )
    out.add_argument("--private", action="store_true", help="With --push-to-hub: create the repository private.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = vars(args)
    print("convert_checkpoint.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in options.items()))
    try:
        convert(**options)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
