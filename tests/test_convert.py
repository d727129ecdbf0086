"""convert_checkpoint.py: InternVL2.5 (release or native layout) + Chameleon VQGAN -> an ARMOR checkpoint folder.

Reference numbers come from the InternVL2.5 fixtures (tests/fixtures/internvl2_5-tiny-*/, see fixtures/README.md):
outputs of the reference `InternVLChatModel` on stored inputs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, InternVLForConditionalGeneration

from armor import convert_checkpoint as cc
from armor.modeling_armor import ArmorForConditionalGeneration

INTERNVL = {"internlm2": FIXTURES / "internvl2_5-tiny-internlm2", "qwen2": FIXTURES / "internvl2_5-tiny-qwen2"}
VQGAN = FIXTURES / "chameleon-vqgan-tiny"
TOLERANCE = 1e-4
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def reference(llm: str) -> dict[str, torch.Tensor]:
    return load_file(INTERNVL[llm] / "inputs_and_outputs.safetensors")


def native_internvl_state_dict(source: cc.InternVLSource) -> dict[str, torch.Tensor]:
    """The whole mapped InternVL state dict in memory, from the converter's streamed blocks."""
    state_dict = {}
    for name, blocks in cc.iterate_weights(source.jobs, source.checkpoint):
        blocks = list(blocks)
        state_dict[name] = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    return state_dict


def native_model(source: cc.InternVLSource) -> InternVLForConditionalGeneration:
    """transformers' own InternVL, holding the mapped weights (strict: no missing or unexpected key)."""
    model = InternVLForConditionalGeneration(source.internvl_config()).eval()
    model.load_state_dict(native_internvl_state_dict(source), strict=True)
    return model


def copy_tokenizer_files(source: Path, target: Path):
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


# ---------------------------------------------------------------------------------------------- STEP 1: mapping


@pytest.fixture(scope="module", params=["internlm2", "qwen2"])
def mapped(request):
    llm = request.param
    source = cc.open_internvl(INTERNVL[llm])
    return llm, source, native_model(source)


def test_release_weights_reproduce_the_reference_in_transformers_internvl(mapped):
    llm, _, model = mapped
    ref = reference(llm)
    with torch.no_grad():
        vit = model.model.vision_tower(pixel_values=ref["pixel_values"]).last_hidden_state
        features = model.model.get_image_features(
            pixel_values=ref["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        image = model(input_ids=ref["input_ids_image"], pixel_values=ref["pixel_values"]).logits
        text = model(input_ids=ref["input_ids_text"]).logits
    assert (vit - ref["vit_last_hidden_state"]).abs().max() < TOLERANCE
    assert (features - ref["vit_embeds"]).abs().max() < TOLERANCE
    assert (image - ref["logits_image"]).abs().max() < TOLERANCE
    assert (text - ref["logits_text"]).abs().max() < TOLERANCE
    assert ref["logits_image"].abs().max() > 1.0  # not a comparison of near-zero numbers


def test_release_weights_give_the_reference_greedy_tokens(mapped):
    llm, _, model = mapped
    ref = reference(llm)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        text = model.generate(input_ids=ref["input_ids_text"], max_new_tokens=8, do_sample=False)
        image = model.generate(
            input_ids=ref["input_ids_image"], pixel_values=ref["pixel_values"], max_new_tokens=8, do_sample=False
        )
    assert text[0, -8:].tolist() == ref["generated_ids_text"][0].tolist()
    assert image[0, -8:].tolist() == ref["generated_ids_image"][0].tolist()


def test_release_configs_map_to_native_configs():
    internlm2 = cc.open_internvl(INTERNVL["internlm2"]).internvl_config()
    qwen2 = cc.open_internvl(INTERNVL["qwen2"]).internvl_config()
    assert internlm2.text_config.model_type == "llama"
    assert internlm2.text_config.rope_parameters == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
    assert (internlm2.text_config.num_key_value_heads, internlm2.text_config.head_dim) == (2, 16)
    assert internlm2.text_config.attention_bias is False and internlm2.tie_word_embeddings is False
    assert qwen2.text_config.model_type == "qwen2"
    assert qwen2.text_config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert (internlm2.image_token_id, qwen2.image_token_id) == (1002, 1005)
    vision = internlm2.vision_config
    assert (vision.norm_type, vision.use_qk_norm, vision.attention_bias) == ("layer_norm", False, True)
    assert vision.use_mean_pooling  # i.e. no final LayerNorm after the encoder, as in InternViT
    assert internlm2.image_seq_length == 256 and internlm2.vision_feature_layer == -1


def test_internlm2_wqkv_is_split_per_kv_head_group():
    """Rows of kv head j: its G query heads, then its k head, then its v head (G = heads / kv_heads)."""
    heads, kv_heads, head_dim, hidden = 4, 2, 3, 5
    group = heads // kv_heads
    rows = torch.arange((heads + 2 * kv_heads) * head_dim).float().unsqueeze(1).expand(-1, hidden)
    checkpoint = type(
        "Checkpoint", (), {"entries": {"w": cc.TensorEntry(Path("x"), torch.float32, tuple(rows.shape))}}
    )
    job = cc.internlm2_wqkv_job(checkpoint, "w", ["q", "k", "v"], heads, kv_heads)
    query, key, value = job.build([rows])
    block = (group + 2) * head_dim
    for j in range(kv_heads):
        assert torch.equal(query[j * group * head_dim : (j + 1) * group * head_dim], rows[j * block : j * block + 6])
        assert torch.equal(key[j * head_dim : (j + 1) * head_dim], rows[j * block + 6 : j * block + 9])
        assert torch.equal(value[j * head_dim : (j + 1) * head_dim], rows[j * block + 9 : (j + 1) * block])
    assert dict(job.targets) == {"q": (12, 5), "k": (6, 5), "v": (6, 5)}


def internvit_6b_style_folder(tmp_path: Path) -> Path:
    """The internlm2 fixture with an InternViT-6B-style tower: RMSNorm, qk-norm, no qkv bias (random weights)."""
    folder = tmp_path / "internvl-vit6b"
    folder.mkdir()
    config = json.loads((INTERNVL["internlm2"] / "config.json").read_text())
    config["vision_config"].update(norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
    (folder / "config.json").write_text(json.dumps(config))
    copy_tokenizer_files(INTERNVL["internlm2"], folder)
    weights = load_file(INTERNVL["internlm2"] / "model.safetensors")
    generator = torch.Generator().manual_seed(6)
    width = config["vision_config"]["hidden_size"]
    for layer in range(config["vision_config"]["num_hidden_layers"]):
        prefix = f"vision_model.encoder.layers.{layer}."
        del weights[prefix + "attn.qkv.bias"], weights[prefix + "norm1.bias"], weights[prefix + "norm2.bias"]
        for norm in ("attn.q_norm.weight", "attn.k_norm.weight"):
            weights[prefix + norm] = 1 + 0.3 * torch.randn(width, generator=generator)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def internvit_direct(weights: dict[str, torch.Tensor], pixel_values: torch.Tensor, config: dict) -> torch.Tensor:
    """InternViT-6B's forward written out from its description (pre-norm blocks, layer scales, qk RMSNorm over all
    heads, exact GELU), straight from the release tensors."""
    width, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    prefix = "vision_model.embeddings."
    patches = torch.nn.functional.conv2d(
        pixel_values, weights[prefix + "patch_embedding.weight"], weights[prefix + "patch_embedding.bias"], stride=14
    )
    x = torch.cat([weights[prefix + "class_embedding"], patches.flatten(2).transpose(1, 2)], dim=1)
    x = x + weights[prefix + "position_embedding"]
    for layer in range(config["num_hidden_layers"]):
        w = {k.split(f"layers.{layer}.")[1]: v for k, v in weights.items() if f"encoder.layers.{layer}." in k}
        h = rms(x, w["norm1.weight"])
        q, k, v = (h @ w["attn.qkv.weight"].T).split(width, dim=-1)
        q, k = rms(q, w["attn.q_norm.weight"]), rms(k, w["attn.k_norm.weight"])
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        attention = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        attention = attention.transpose(1, 2).flatten(2) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        x = x + w["ls1"] * attention
        h = rms(x, w["norm2.weight"])
        h = torch.nn.functional.gelu(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"])
        x = x + w["ls2"] * (h @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"])
    return x


def test_internvit_6b_layout_rms_norm_and_qk_norm_match_a_direct_computation(tmp_path):
    folder = internvit_6b_style_folder(tmp_path)
    source = cc.open_internvl(folder)
    vision = source.internvl_config().vision_config
    assert (vision.norm_type, vision.use_qk_norm, vision.attention_bias) == ("rms_norm", True, False)
    model = native_model(source)
    pixel_values = reference("internlm2")["pixel_values"]
    config = json.loads((folder / "config.json").read_text())["vision_config"]
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        direct = internvit_direct(load_file(folder / "model.safetensors"), pixel_values, config)
    assert (ours - direct).abs().max() < TOLERANCE
    assert direct.abs().max() > 1.0


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory) -> Path:
    """The internlm2 fixture saved by transformers' InternVLForConditionalGeneration: the '-hf' layout (transformers 5
    saves the LLM as `language_model.model.*` and the towers at the top level, as the published -hf repos are)."""
    folder = tmp_path_factory.mktemp("native") / "internvl2_5-tiny-internlm2-hf"
    native_model(cc.open_internvl(INTERNVL["internlm2"])).save_pretrained(folder)
    copy_tokenizer_files(INTERNVL["internlm2"], folder)
    return folder


@pytest.mark.parametrize("key_style", ["as saved", "model.* prefixed"])
def test_native_layout_maps_to_the_same_tensors_as_the_release(native_folder, tmp_path, key_style):
    folder = native_folder
    if key_style == "model.* prefixed":
        folder = tmp_path / "prefixed"
        shutil.copytree(native_folder, folder)
        weights = load_file(folder / "model.safetensors")
        renamed = {cc.apply_renames(name, cc.NATIVE_LEGACY_RENAMES): tensor for name, tensor in weights.items()}
        assert all(name.startswith(("model.", "lm_head.")) for name in renamed)
        save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    source = cc.open_internvl(folder)
    assert source.layout == "native"
    from_native = native_internvl_state_dict(source)
    from_release = native_internvl_state_dict(cc.open_internvl(INTERNVL["internlm2"]))
    assert from_native.keys() == from_release.keys()
    assert all(torch.equal(from_native[name], from_release[name]) for name in from_release)


# ---------------------------------------------------------------------------------------------- STEP 2: converter


def run_convert(internvl: Path, output: Path, **options) -> Path:
    options.setdefault("adapter_layers", 2)
    options.setdefault("vqgan", str(VQGAN))
    return cc.convert(str(internvl), output=output, log=lambda _: None, **options)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Both fixtures converted once with the defaults (random adapter) and 2 adapter layers."""
    base = tmp_path_factory.mktemp("converted")
    return {llm: run_convert(folder, base / f"armor-{llm}") for llm, folder in INTERNVL.items()}


def test_checkpoint_folder_has_every_file_of_the_layout(converted):
    folder = converted["internlm2"]
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "README.md",
        "vqgan/config.json",
        "vqgan/model.safetensors",
        *cc.CODE_FILES,
    ):
        assert (folder / name).is_file(), name
    assert list((folder / "tokenizer").iterdir())
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == cc.AUTO_MAP and config["model_type"] == "armor"
    assert (config["num_adapter_layers"], config["image_codebook_size"], config["num_image_codes"]) == (2, 64, 1024)
    assert (config["imgbos_token_id"], config["image_token_id"], config["image_start_token_id"]) == (1009, 1002, 1000)
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_armor.ArmorProcessor"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 998  # <|im_end|>, where InternVL2.5's chat stops
    assert {"guidance_scale", "image_top_k", "image_temperature"} <= set(generation)
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_automodel_with_remote_code_reproduces_the_reference(converted, llm):
    folder, ref = converted[llm], reference(llm)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    vocab = model.config.text_config.vocab_size
    assert type(model).__name__ == "ArmorForConditionalGeneration"
    assert [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<imgbos>", "<imgend>", "<imgpad>")] == [
        vocab,
        vocab + 1,
        vocab + 2,
    ]
    with torch.no_grad():
        image = model(ref["input_ids_image"], pixel_values=ref["pixel_values"]).logits
        text = model(ref["input_ids_text"]).logits
        answer_image = model.generate(
            ref["input_ids_image"], pixel_values=ref["pixel_values"], max_new_tokens=8, eos_token_id=None
        )
        answer_text = model.generate(ref["input_ids_text"], max_new_tokens=8, eos_token_id=None)
    assert image.shape[-1] == vocab + 1
    assert (image[..., :vocab] - ref["logits_image"]).abs().max() < TOLERANCE
    assert (text[..., :vocab] - ref["logits_text"]).abs().max() < TOLERANCE
    assert answer_image[0, -8:].tolist() == ref["generated_ids_image"][0].tolist()
    assert answer_text[0, -8:].tolist() == ref["generated_ids_text"][0].tolist()


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def test_new_parameters_start_as_documented(converted):
    weights = read_weights(converted["qwen2"])
    lm_head, embeddings = weights["lm_head.weight"], weights["model.language_model.embed_tokens.weight"]
    assert weights["image_token_embeddings.weight"].shape == (3 + 64, 96)
    assert weights["visual_head.weight"].shape == (2 + 64, 96)
    assert torch.allclose(weights["imgbos_head.weight"], lm_head.mean(0, keepdim=True), atol=1e-6)
    new_rows = weights["image_token_embeddings.weight"]
    assert (new_rows.mean(0) - embeddings.mean(0)).abs().max() < 0.1 * embeddings.std()
    assert 0.05 < (new_rows - embeddings.mean(0)).std() / embeddings.std() < 0.2  # noise: 0.1x the rows' spread
    assert abs(weights["visual_head.weight"].std() - 0.02) < 0.003
    assert torch.equal(weights["adapter.norm.weight"], torch.ones(96))
    assert abs(weights["adapter.layers.0.mlp.up_proj.weight"].std() - 0.02) < 0.003
    assert torch.equal(weights["adapter.layers.1.self_attn.q_proj.bias"], torch.zeros(96))


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_untrained_imgbos_score_reads_the_adapter_and_stays_below_the_best_text_logit(converted, llm):
    """The mean `lm_head` row on the adapter's output: near the average text logit, so greedy text stays the base's."""
    model = ArmorForConditionalGeneration.from_pretrained(converted[llm]).eval()
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, vocab - 20, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
    text, imgbos = logits[..., :vocab], logits[..., vocab]
    assert (imgbos < text.max(-1).values).all()
    assert (imgbos - text.mean(-1)).abs().max() < 0.1 * text.std(-1).min()


def test_untrained_imgbos_score_stays_below_the_best_text_logit_with_a_copied_adapter(tmp_path):
    """With `--adapter-init copy-top` (the shape world's choice) the adapter's output is not the LLM's last state."""
    model = ArmorForConditionalGeneration.from_pretrained(
        run_convert(INTERNVL["qwen2"], tmp_path / "out", adapter_init="copy-top", adapter_layers=2)
    ).eval()
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, vocab - 20, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert (logits[..., vocab] < logits[..., :vocab].max(-1).values).all()


def test_same_seed_same_weights_other_seed_other_new_weights(converted, tmp_path):
    again = read_weights(run_convert(INTERNVL["qwen2"], tmp_path / "again"))
    other = read_weights(run_convert(INTERNVL["qwen2"], tmp_path / "other", seed=1))
    first = read_weights(converted["qwen2"])
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["visual_head.weight"], other["visual_head.weight"])
    assert torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_copy_top_adapter_starts_as_the_llms_top_layers(tmp_path):
    weights = read_weights(
        run_convert(INTERNVL["internlm2"], tmp_path / "out", adapter_init="copy-top", adapter_layers=1)
    )
    top = {k.split("layers.1.")[1]: v for k, v in weights.items() if k.startswith("model.language_model.layers.1.")}
    adapter = {k.split("layers.0.")[1]: v for k, v in weights.items() if k.startswith("adapter.layers.0.")}
    assert top.keys() == adapter.keys() and len(top) == 9
    assert all(torch.equal(top[name], adapter[name]) for name in top)
    assert torch.equal(weights["adapter.norm.weight"], weights["model.language_model.norm.weight"])


def sharded_copy(source: Path, target: Path) -> Path:
    """The fixture as a 2-shard release checkpoint with an index, as the real releases are stored."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != "model.safetensors":
            shutil.copy2(path, target / path.name)
    weights = load_file(source / "model.safetensors")
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file_name, part in halves.items():
        save_file({name: weights[name] for name in part}, target / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def test_sharded_source_and_sharded_output_give_the_same_model(converted, tmp_path):
    source = sharded_copy(INTERNVL["internlm2"], tmp_path / "sharded")
    output = run_convert(source, tmp_path / "out", max_shard_size="400KB")
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(path.name for path in output.glob("model-*.safetensors"))
    for shard in shards:
        with safe_open(output / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    sharded, single = read_weights(output), read_weights(converted["internlm2"])
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())


def test_tensors_streamed_in_small_blocks_come_out_the_same(converted, tmp_path, monkeypatch):
    """Blocks of ~1 kB (the real size is 64 MB): every large-tensor path reads, makes and writes many row blocks."""
    monkeypatch.setattr(cc, "CHUNK_BYTES", 1024)
    blocked, whole = read_weights(run_convert(INTERNVL["qwen2"], tmp_path / "out")), read_weights(converted["qwen2"])
    assert blocked.keys() == whole.keys()
    for name in whole:
        if name.startswith(("model.", "lm_head.")):
            assert torch.equal(blocked[name], whole[name]), name
    assert torch.allclose(blocked["imgbos_head.weight"], whole["imgbos_head.weight"], atol=1e-6)
    for name in ("image_token_embeddings.weight", "visual_head.weight", "adapter.layers.0.mlp.down_proj.weight"):
        assert blocked[name].shape == whole[name].shape
        assert abs(blocked[name].std() / whole[name].std() - 1) < 0.1


def test_native_layout_input_converts_to_the_same_checkpoint(converted, native_folder, tmp_path):
    from_native = read_weights(run_convert(native_folder, tmp_path / "out"))
    from_release = read_weights(converted["internlm2"])
    assert from_native.keys() == from_release.keys()
    assert all(torch.equal(from_native[name], from_release[name]) for name in from_release)


def test_dtype_and_image_size_options(tmp_path):
    output = run_convert(INTERNVL["qwen2"], tmp_path / "out", dtype="bfloat16", image_size=256)
    assert {tensor.dtype for tensor in read_weights(output).values()} == {torch.bfloat16}
    config = json.loads((output / "config.json").read_text())
    assert (config["dtype"], config["num_image_codes"]) == ("bfloat16", 256)
    vqgan = load_file(output / "vqgan" / "model.safetensors")
    assert {tensor.dtype for tensor in vqgan.values()} == {torch.float32}


def test_a_vqgan_folder_of_ours_is_accepted(converted, tmp_path):
    output = run_convert(INTERNVL["qwen2"], tmp_path / "out", vqgan=str(converted["internlm2"] / "vqgan"))
    assert (
        load_file(output / "vqgan" / "model.safetensors").keys()
        == load_file(converted["internlm2"] / "vqgan" / "model.safetensors").keys()
    )


# ---------------------------------------------------------------------------------------------- bad inputs


def not_internvl(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(INTERNVL["qwen2"], folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return folder


def missing_shard(tmp_path: Path) -> Path:
    folder = sharded_copy(INTERNVL["internlm2"], tmp_path / "src")
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def truncated_shard(tmp_path: Path) -> Path:
    folder = sharded_copy(INTERNVL["internlm2"], tmp_path / "src")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return folder


def index_names_a_missing_tensor(tmp_path: Path) -> Path:
    folder = sharded_copy(INTERNVL["internlm2"], tmp_path / "src")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.layers.9.ffn_norm.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def unsupported_llm(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(INTERNVL["internlm2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def without_tokenizer(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(INTERNVL["qwen2"] / name, folder / name)
    return folder


def damaged_tokenizer_model(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(INTERNVL["internlm2"], folder)
    (folder / "tokenizer.model").write_bytes(b"\xff\xfe not a sentencepiece model")
    return folder


def without_output_head(tmp_path: Path, tied: bool = False) -> Path:
    """The qwen2 fixture without `language_model.lm_head.weight`, as a release with tied embeddings stores it."""
    folder = tmp_path / "src"
    shutil.copytree(INTERNVL["qwen2"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["language_model.lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = tied
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_SOURCES = {
    "not InternVL2.5": (not_internvl, "holds a 'qwen2' model .* not InternVL2.5"),
    "missing shard": (missing_shard, "model-00002-of-00002.safetensors named by .* is missing"),
    "truncated shard": (truncated_shard, "is truncated"),
    "index names a missing tensor": (index_names_a_missing_tensor, "does not hold it"),
    "unsupported LLM": (unsupported_llm, "Phi3ForCausalLM, which ARMOR does not support"),
    "no tokenizer": (without_tokenizer, "src has no tokenizer .*pass the folder .* with --tokenizer PATH"),
    "damaged tokenizer": (damaged_tokenizer_model, "tokenizer in .*src could not be read \\(DecodeError"),
    "untied, no output head": (without_output_head, "stores no LLM output head .*tie_word_embeddings false"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_fail_clearly_and_leave_nothing_behind(tmp_path, case):
    make_source, message = BAD_SOURCES[case]
    source = make_source(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(cc.ConversionError, match=message):
        run_convert(source, tmp_path / "out")
    assert sorted(tmp_path.iterdir()) == before


def test_a_tokenizer_folder_without_tokenizer_files_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(cc.ConversionError, match="empty has no tokenizer .* with --tokenizer PATH"):
        run_convert(INTERNVL["qwen2"], tmp_path / "out", tokenizer=str(empty))
    assert [path.name for path in tmp_path.iterdir()] == ["empty"]


def test_tied_output_head_is_written_as_a_copy_of_the_embeddings(tmp_path):
    folder = without_output_head(tmp_path, tied=True)
    messages = []
    output = cc.convert(str(folder), vqgan=str(VQGAN), output=tmp_path / "out", adapter_layers=2, log=messages.append)
    weights = read_weights(output)
    assert torch.equal(weights["lm_head.weight"], weights["model.language_model.embed_tokens.weight"])
    assert torch.allclose(weights["imgbos_head.weight"], weights["lm_head.weight"].mean(0, keepdim=True), atol=1e-6)
    assert json.loads((output / "config.json").read_text())["text_config"]["tie_word_embeddings"] is False
    assert any("lm_head is written as an untied copy" in message for message in messages)


def fail_writing_after(count: int, error: BaseException, monkeypatch) -> list:
    """Make the streaming writer raise `error` once `count` tensors are in the staging folder; returns the writers
    it was called on and the names written."""
    original, calls = cc.StreamingSafetensorsWriter.write, []

    def write(self, name, blocks):
        if len(calls) == count:
            raise error
        original(self, name, blocks)
        calls.append((self, name))

    monkeypatch.setattr(cc.StreamingSafetensorsWriter, "write", write)
    return calls


@pytest.mark.parametrize(
    "error, overwrite", [(OSError(28, "No space left on device"), False), (KeyboardInterrupt(), True)]
)
def test_a_failure_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, error, overwrite):
    output = tmp_path / "out"
    if overwrite:  # an older checkpoint to replace: it must survive the failed conversion
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    calls = fail_writing_after(5, error, monkeypatch)
    with pytest.raises(type(error)):
        run_convert(INTERNVL["qwen2"], output, overwrite=overwrite)
    assert len(calls) == 5  # the failure hit with tensors already in the staging folder
    writer = calls[-1][0]
    assert writer.handle is None or writer.handle.closed  # the open shard was closed, not left to the GC
    assert sorted(tmp_path.rglob("*")) == before
    if overwrite:
        assert (output / "keep.txt").read_text() == "mine"


def test_a_failed_move_into_place_restores_the_old_output(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    original = os.replace

    def replace(source, target):
        if ".partial-" in Path(source).name:
            raise OSError(18, "Invalid cross-device link")
        return original(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        run_convert(INTERNVL["qwen2"], output, overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_vqgan_folder_whose_config_disagrees_with_its_weights_is_refused(converted, tmp_path):
    vqgan = tmp_path / "vqgan"
    shutil.copytree(converted["internlm2"] / "vqgan", vqgan)
    config = json.loads((vqgan / "config.json").read_text())
    config["num_embeddings"] = 128
    (vqgan / "config.json").write_text(json.dumps(config))
    with pytest.raises(cc.ConversionError, match="config.json disagrees with the weights"):
        run_convert(INTERNVL["internlm2"], tmp_path / "out", vqgan=str(vqgan))
    assert not (tmp_path / "out").exists()


def test_tokenizer_that_does_not_fit_the_model_is_refused(native_folder, tmp_path):
    with pytest.raises(cc.ConversionError, match="has 1012 tokens but the model's llm_config.vocab_size is 1009"):
        run_convert(INTERNVL["internlm2"], tmp_path / "out", tokenizer=str(INTERNVL["qwen2"]))
    with pytest.raises(cc.ConversionError, match="image_token_id is 1002 but the tokenizer's <IMG_CONTEXT> is 1005"):
        run_convert(native_folder, tmp_path / "out", tokenizer=str(INTERNVL["qwen2"]))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_is_replaced_only_when_complete(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(cc.ConversionError, match="--overwrite"):
        run_convert(INTERNVL["qwen2"], output)
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    with pytest.raises(cc.ConversionError, match="not (an )?InternVL2.5"):
        run_convert(VQGAN, output, overwrite=True)
    assert [path.name for path in output.iterdir()] == ["keep.txt"]  # a failed overwrite keeps the old folder
    run_convert(INTERNVL["qwen2"], output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_repo_id_offline_asks_for_a_local_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(cc.ConversionError, match="pass its local folder"):
        run_convert("OpenGVLab/InternVL2_5-1B", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_creates_the_repo_and_uploads_the_finished_folder(tmp_path, monkeypatch):
    calls = []

    class FakeHfApi:
        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            calls.append(("upload_folder", repo_id, Path(folder_path), files))

    monkeypatch.setattr(cc, "HfApi", FakeHfApi)
    output = run_convert(INTERNVL["qwen2"], tmp_path / "out", push_to_hub="me/armor-tiny", private=True)
    assert calls[0] == ("create_repo", "me/armor-tiny", True, True)
    name, repo_id, folder, files = calls[1]
    assert (name, repo_id, folder) == ("upload_folder", "me/armor-tiny", output)
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md", "processor_config.json"}
    assert expected | set(cc.CODE_FILES) | {"vqgan/config.json", "vqgan/model.safetensors"} <= set(files)
    assert any(name.startswith("tokenizer/") for name in files)


def test_a_repo_id_online_is_downloaded_with_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    requested = []

    def fake_snapshot_download(repo_id, **kwargs):
        requested.append(repo_id)
        return str(INTERNVL["qwen2"])

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    output = run_convert("OpenGVLab/InternVL2_5-1B", tmp_path / "out")
    assert requested == ["OpenGVLab/InternVL2_5-1B"]
    assert "OpenGVLab/InternVL2_5-1B" in (output / "README.md").read_text()


def test_internvit_6b_style_checkpoint_converts_and_loads(tmp_path):
    folder = internvit_6b_style_folder(tmp_path)
    output = run_convert(folder, tmp_path / "out")
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    pixel_values = reference("internlm2")["pixel_values"]
    config = json.loads((folder / "config.json").read_text())["vision_config"]
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        direct = internvit_direct(load_file(folder / "model.safetensors"), pixel_values, config)
    assert (ours - direct).abs().max() < TOLERANCE


def test_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
    code = cc.main(["--internvl", str(VQGAN), "--vqgan", str(VQGAN), "--output", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_command_line_reports_a_malformed_preprocessor_config(native_folder, tmp_path, capsys):
    folder = tmp_path / "src"
    shutil.copytree(native_folder, folder)
    (folder / "preprocessor_config.json").write_text('{"max_patches": 12,')
    code = cc.main(["--internvl", str(folder), "--vqgan", str(VQGAN), "--output", str(tmp_path / "out")])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and f"{folder / 'preprocessor_config.json'} is not valid JSON" in error
    assert [path.name for path in tmp_path.iterdir()] == ["src"]


def test_help_documents_every_option():
    script = Path(cc.__file__)
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    for option in (
        "--internvl",
        "--vqgan",
        "--tokenizer",
        "--adapter-layers",
        "--dtype",
        "--image-size",
        "--adapter-init",
        "--seed",
        "--output",
        "--overwrite",
        "--push-to-hub",
        "--private",
        "--max-shard-size",
        "--guidance-scale",
        "--image-top-k",
        "--image-temperature",
    ):
        assert option in result.stdout
    for fact in ("keep", "copy-top", "snapshot_download", "weights_only=True", "mean of the lm_head rows"):
        assert fact in result.stdout
