"""Tiny ARMOR configurations for the tests: the real classes at toy sizes, random weights."""

import torch

from armor.configuration_armor import ArmorConfig
from armor.modeling_armor import ArmorForConditionalGeneration

VOCAB_SIZE = 120
IMG_CONTEXT, IMG_START, IMG_END = 100, 101, 102
EOS = 5


def tiny_config(
    llm: str = "qwen2", num_image_codes: int = 16, vocab_size: int = VOCAB_SIZE, **overrides
) -> ArmorConfig:
    """A 2-layer LLM of the given family, a 1-layer ViT, a 2-level VQGAN with 64 codes (2x downsampling)."""
    text_config = {
        "model_type": llm,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "eos_token_id": EOS,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 448,
        "patch_size": 14,
    }
    vqgan_config = {
        "num_embeddings": 64,
        "embed_dim": 16,
        "latent_channels": 16,
        "base_channels": 32,
        "channel_multiplier": [1, 2],
        "num_res_blocks": 1,
        "resolution": 32,
    }
    values = {
        "text_config": text_config,
        "vision_config": vision_config,
        "vqgan_config": vqgan_config,
        "image_codebook_size": 64,
        "num_image_codes": num_image_codes,
        "num_adapter_layers": 2,
        "image_token_id": IMG_CONTEXT,
        "image_start_token_id": IMG_START,
        "image_end_token_id": IMG_END,
    }
    values.update(overrides)
    return ArmorConfig(**values)


def tiny_model(llm: str = "qwen2", seed: int = 0, **overrides) -> ArmorForConditionalGeneration:
    """A tiny model with weights large enough that logits are O(1) and greedy choices are well separated."""
    torch.manual_seed(seed)
    model = ArmorForConditionalGeneration(tiny_config(llm, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("vqgan."):
                continue
            if parameter.ndim >= 2:
                parameter.normal_(0, parameter.shape[-1] ** -0.5)
            elif name.endswith("weight"):
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0, 0.1)
        model.image_token_embeddings.weight.normal_(0, 1)
        model.model.language_model.embed_tokens.weight.normal_(0, 1)
    model.generation_config.eos_token_id = EOS
    return model.eval()


def image_prompt(num_tiles: int = 1, text_ids: tuple[int, ...] = (7, 8, 9)) -> torch.LongTensor:
    """`<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>` + a question."""
    ids = [1, 3, IMG_START] + [IMG_CONTEXT] * (256 * num_tiles) + [IMG_END, *text_ids]
    return torch.tensor([ids])
