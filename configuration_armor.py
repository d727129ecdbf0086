"""Configuration of ARMOR: an InternVL2.5 model that can also draw, and its bundled Chameleon VQGAN."""

import math

from huggingface_hub.dataclasses import strict
from transformers import InternVLConfig, PreTrainedConfig
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig


@strict
class ArmorVQGANConfig(ChameleonVQVAEConfig):
    r"""
    Chameleon's VQGAN (taming `VQModel`: encoder, vector quantizer without normalisation, decoder). The defaults are
    the released model's: 8192 codes of 256 dimensions, 16x downsampling, trained at 512px.

    Field names follow transformers' `ChameleonVQVAEConfig`; in Chameleon's `vqgan.yaml` they are `embed_dim`,
    `n_embed`, `double_z`, `z_channels`, `resolution`, `in_channels`, `out_ch`, `ch`, `ch_mult`, `num_res_blocks`,
    `attn_resolutions` and `dropout`.

    out_channels (`int`, *optional*, defaults to 3):
        Channels of the decoded image (`out_ch`).
    """

    model_type = "armor_vqgan"
    base_config_key = "vqgan_config"

    out_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side: one halving per resolution level but the last."""
        return 2 ** (len(self.channel_multiplier) - 1)

    def validate_vqgan(self):
        if self.double_latent:
            raise ValueError("ArmorVQGANConfig: `double_latent` (double_z) must be False for a VQGAN.")
        if self.num_embeddings < 1 or self.embed_dim < 1:
            raise ValueError(
                f"ArmorVQGANConfig: `num_embeddings` ({self.num_embeddings}) and `embed_dim` ({self.embed_dim}) "
                "must be positive."
            )
        if self.base_channels % 32:
            raise ValueError(
                f"ArmorVQGANConfig: `base_channels` ({self.base_channels}) must be a multiple of 32 "
                "(the GroupNorm group count)."
            )


@strict
class ArmorConfig(InternVLConfig):
    r"""
    ARMOR: an InternVL2.5 model (vision tower, pixel-shuffle projector, LLM) plus the parts that let it answer with
    images: an embedding table for the image tokens, `num_adapter_layers` decoder layers on top of the LLM, a visual
    head, and an `<imgbos>` score beside the LLM's own output head.

    Token ids. The LLM's vocabulary is `[0, V)` with `V = text_config.vocab_size`. ARMOR appends `<imgbos> = V`,
    `<imgend> = V + 1`, `<imgpad> = V + 2` and the image codes `V + 3 ... V + 2 + K` (`K = image_codebook_size`).
    The text head scores ids `[0, V]` (vocabulary + `<imgbos>`); the visual head scores ids `[V + 1, V + 3 + K)`
    (`<imgend>`, `<imgpad>`, the codes). Every id belongs to exactly one head.

    image_start_token_id (`int`, *optional*, defaults to 151665):
        Id of `<img>`, which opens the `<IMG_CONTEXT>` run of an input image.
    image_end_token_id (`int`, *optional*, defaults to 151666):
        Id of `</img>`.
    vqgan_config (`ArmorVQGANConfig` or `dict`, *optional*):
        The bundled VQGAN (weights in the checkpoint's `vqgan/` folder).
    num_adapter_layers (`int`, *optional*, defaults to 4):
        Decoder layers of the LLM's own kind between the LLM's last hidden state and the visual head.
    image_codebook_size (`int`, *optional*, defaults to 8192):
        Number of VQGAN codes; must equal `vqgan_config.num_embeddings`.
    num_image_codes (`int`, *optional*, defaults to 1024):
        Codes per generated image, a square grid: 1024 = 32x32 (512px with a 16x VQGAN), 256 = 16x16 (256px).
    imgbos_token_id, imgend_token_id, imgpad_token_id (`int`, *optional*):
        Ids of `<imgbos>`, `<imgend>`, `<imgpad>`; default to `V`, `V + 1`, `V + 2` and must equal them.
    text_loss_weight (`float`, *optional*, defaults to 1.0):
        The paper's alpha: weight of the cross-entropy over text-mode targets.
    image_loss_weight (`float`, *optional*, defaults to 1.0):
        The paper's beta: weight of the cross-entropy over image-mode targets.
    """

    model_type = "armor"
    sub_configs = {**InternVLConfig.sub_configs, "vqgan_config": ArmorVQGANConfig}

    vqgan_config: dict | PreTrainedConfig | None = None
    image_start_token_id: int = 151665
    image_end_token_id: int = 151666
    num_adapter_layers: int = 4
    image_codebook_size: int = 8192
    num_image_codes: int = 1024
    imgbos_token_id: int | None = None
    imgend_token_id: int | None = None
    imgpad_token_id: int | None = None
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vqgan_config, dict):
            self.vqgan_config = ArmorVQGANConfig(**self.vqgan_config)
        elif self.vqgan_config is None:
            self.vqgan_config = ArmorVQGANConfig()
        super().__post_init__(**kwargs)
        vocab_size = self.text_config.vocab_size
        if self.imgbos_token_id is None:
            self.imgbos_token_id = vocab_size
        if self.imgend_token_id is None:
            self.imgend_token_id = vocab_size + 1
        if self.imgpad_token_id is None:
            self.imgpad_token_id = vocab_size + 2

    def validate_armor(self):
        vocab_size = self.text_config.vocab_size
        for field, expected in (
            ("imgbos_token_id", vocab_size),
            ("imgend_token_id", vocab_size + 1),
            ("imgpad_token_id", vocab_size + 2),
        ):
            if getattr(self, field) != expected:
                raise ValueError(
                    f"ArmorConfig: `{field}` is {getattr(self, field)} but must be {expected}: ARMOR's tokens follow "
                    f"the LLM vocabulary (text_config.vocab_size = {vocab_size}) as <imgbos>, <imgend>, <imgpad>."
                )
        if self.num_adapter_layers < 1:
            raise ValueError(f"ArmorConfig: `num_adapter_layers` must be at least 1, got {self.num_adapter_layers}.")
        if self.image_codebook_size != self.vqgan_config.num_embeddings:
            raise ValueError(
                f"ArmorConfig: `image_codebook_size` ({self.image_codebook_size}) differs from the VQGAN's codebook "
                f"(`vqgan_config.num_embeddings` = {self.vqgan_config.num_embeddings}); set them equal."
            )
        side = math.isqrt(self.num_image_codes) if self.num_image_codes > 0 else 0
        if side < 1 or side * side != self.num_image_codes:
            raise ValueError(
                f"ArmorConfig: `num_image_codes` ({self.num_image_codes}) must be a square grid of VQGAN codes, "
                "e.g. 1024 (32x32, 512px) or 256 (16x16, 256px)."
            )
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError(
                f"ArmorConfig: loss weights must be >= 0, got `text_loss_weight` = {self.text_loss_weight} and "
                f"`image_loss_weight` = {self.image_loss_weight}."
            )
        if self.tie_word_embeddings:
            raise ValueError("ArmorConfig: `tie_word_embeddings` must be False: InternVL2.5's output head is untied.")
        vision = self.vision_config
        patches_per_side = vision.image_size[0] // vision.patch_size[0]
        tokens_per_tile = int(patches_per_side * self.downsample_ratio) ** 2
        if tokens_per_tile != self.image_seq_length:
            raise ValueError(
                f"ArmorConfig: `image_seq_length` ({self.image_seq_length}) disagrees with the vision tower, which "
                f"gives {tokens_per_tile} tokens per {vision.image_size[0]}px tile "
                f"(patch {vision.patch_size[0]}, downsample_ratio {self.downsample_ratio})."
            )

    @property
    def image_code_offset(self) -> int:
        """Token id of image code 0."""
        return self.imgpad_token_id + 1

    @property
    def image_grid_size(self) -> int:
        """Codes along one side of a generated image."""
        return math.isqrt(self.num_image_codes)

    @property
    def generated_image_size(self) -> int:
        """Side in pixels of a generated image."""
        return self.image_grid_size * self.vqgan_config.downsample_factor

    def get_adapter_text_config(self) -> PreTrainedConfig:
        """The LLM config extended by the adapter layers, which sit at layer indices `L .. L + N - 1` of one cache."""
        text_config = self.text_config
        num_layers = text_config.num_hidden_layers + self.num_adapter_layers
        values = text_config.to_dict()
        values["num_hidden_layers"] = num_layers
        if getattr(text_config, "layer_types", None) is not None:
            values["layer_types"] = list(text_config.layer_types) + ["full_attention"] * self.num_adapter_layers
        if "max_window_layers" in values:
            values["max_window_layers"] = min(values["max_window_layers"], num_layers)
        adapter_config = type(text_config)(**values)
        adapter_config._attn_implementation = text_config._attn_implementation
        return adapter_config


__all__ = ["ArmorConfig", "ArmorVQGANConfig"]
