"""ARMOR's image tokenizer: Chameleon's VQGAN (taming `VQModel`), images <-> grids of codebook indices.

The encoder, its blocks and the vector quantizer are transformers' maintained Chameleon modules; only the decoder,
which transformers does not ship, is written here. Module and parameter names follow taming's state dict, so
Chameleon's released `vqgan.ckpt` loads key for key (`ArmorVQGANModel.from_chameleon`).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoder,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
    ChameleonVQVAEVectorQuantizer,
)
from transformers.utils import ModelOutput

from .configuration_armor import ArmorVQGANConfig


class ArmorVQGANUpsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (taming's `Upsample` with `resamp_with_conv=True`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class ArmorVQGANDecoder(nn.Module):
    """
    Latents -> pixels, the mirror of `ChameleonVQVAEEncoder`: conv_in, a mid block (resnet, attention, resnet),
    then one up level per channel multiplier from the lowest resolution to the highest, each with
    `num_res_blocks + 1` resnet blocks (plus attention where `attn_resolutions` says) and an upsample but the last,
    then norm, swish, conv_out.

    `up[i]` holds level `i` as in taming, so `up[0]` is the full-resolution level although it runs last.
    """

    def __init__(self, config: ArmorVQGANConfig):
        super().__init__()
        multipliers = tuple(config.channel_multiplier)
        self.num_resolutions = len(multipliers)
        self.num_res_blocks = config.num_res_blocks
        use_attention = config.attn_type == "vanilla"
        attn_resolutions = config.attn_resolutions or []

        block_in = config.base_channels * multipliers[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(config, in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in) if use_attention else nn.Identity()
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(config, in_channels=block_in, out_channels=block_in)

        # Attention placement is decided by the resolution the config was trained at, not by the input's size.
        resolution = config.resolution // 2 ** (self.num_resolutions - 1)
        levels = []
        for level in reversed(range(self.num_resolutions)):
            block_out = config.base_channels * multipliers[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(self.num_res_blocks + 1):
                up.block.append(ChameleonVQVAEEncoderResnetBlock(config, in_channels=block_in, out_channels=block_out))
                block_in = block_out
                if use_attention and resolution in attn_resolutions:
                    up.attn.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            if level != 0:
                up.upsample = ArmorVQGANUpsample(block_in)
                resolution *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(hidden_states)
        hidden_states = self.mid.block_1(hidden_states)
        hidden_states = self.mid.attn_1(hidden_states)
        hidden_states = self.mid.block_2(hidden_states)
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for index, block in enumerate(up.block):
                hidden_states = block(hidden_states)
                if len(up.attn) > 0:
                    hidden_states = up.attn[index](hidden_states)
            if level != 0:
                hidden_states = up.upsample(hidden_states)
        hidden_states = self.norm_out(hidden_states)
        hidden_states = hidden_states * torch.sigmoid(hidden_states)
        return self.conv_out(hidden_states)


@dataclass
class ArmorVQGANOutput(ModelOutput):
    r"""
    reconstruction (`torch.FloatTensor` of shape `(batch_size, out_channels, height, width)`):
        Decoded pixels in [-1, 1] (not clamped); gradients reach the encoder through the straight-through estimator.
    codes (`torch.LongTensor` of shape `(batch_size, height // downsample_factor, width // downsample_factor)`):
        Index of the nearest codebook vector at each latent position.
    embedding_loss (`torch.FloatTensor` of shape `()`):
        Codebook loss plus 0.25 x commitment loss (taming's legacy weighting, as Chameleon's VQGAN was trained).
    """

    reconstruction: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    embedding_loss: torch.FloatTensor | None = None


def vqgan_config_from_chameleon(params: dict) -> ArmorVQGANConfig:
    """Chameleon's `vqgan.yaml` `model.params` (taming names) -> `ArmorVQGANConfig` (transformers names)."""
    ddconfig = params.get("ddconfig")
    if not isinstance(ddconfig, dict) or "embed_dim" not in params or "n_embed" not in params:
        raise ValueError(
            "Chameleon VQGAN params need `embed_dim`, `n_embed` and a `ddconfig` mapping (taming's VQModel layout); "
            f"got keys {sorted(params)}. Pass `model.params` of Chameleon's tokenizer/vqgan.yaml."
        )
    if params.get("remap") is not None:
        raise ValueError("Chameleon VQGAN params: index `remap` is not supported; use a checkpoint without it.")
    # Options of taming's Encoder/Decoder that change the network; only their defaults (Chameleon's) are supported.
    fixed = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}
    renamed = {
        "double_z": "double_latent",
        "z_channels": "latent_channels",
        "resolution": "resolution",
        "in_channels": "in_channels",
        "out_ch": "out_channels",
        "ch": "base_channels",
        "ch_mult": "channel_multiplier",
        "num_res_blocks": "num_res_blocks",
        "attn_resolutions": "attn_resolutions",
        "dropout": "dropout",
        "attn_type": "attn_type",
    }
    unknown = sorted(set(ddconfig) - set(renamed) - set(fixed))
    unsupported = sorted(key for key, value in fixed.items() if key in ddconfig and ddconfig[key] != value)
    if unknown or unsupported:
        raise ValueError(
            f"Chameleon VQGAN ddconfig: unknown keys {unknown} and unsupported values for {unsupported} "
            f"(supported: {fixed}); this loader only reads Chameleon's taming VQModel layout."
        )
    kwargs = {renamed[key]: value for key, value in ddconfig.items() if key in renamed}
    kwargs["channel_multiplier"] = list(kwargs.get("channel_multiplier", ArmorVQGANConfig.channel_multiplier))
    kwargs["attn_resolutions"] = list(kwargs.get("attn_resolutions") or [])
    return ArmorVQGANConfig(embed_dim=params["embed_dim"], num_embeddings=params["n_embed"], **kwargs)


def _read_chameleon_files(config_path: str | os.PathLike, checkpoint_path: str | os.PathLike) -> tuple[dict, dict]:
    """Read `vqgan.yaml`'s `model.params` and `vqgan.ckpt`'s `state_dict`, with errors that name the file."""
    try:
        import yaml  # inside try: transformers' remote-code import check does not demand PyYAML for checkpoint users
    except ImportError as error:
        raise ImportError("Reading Chameleon's vqgan.yaml needs PyYAML: `pip install pyyaml`.") from error
    config_path, checkpoint_path = Path(config_path), Path(checkpoint_path)
    for path, what in ((config_path, "vqgan.yaml"), (checkpoint_path, "vqgan.ckpt")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass the path of Chameleon's tokenizer/{what}.")

    try:
        document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{config_path} is not a YAML file ({error}); pass Chameleon's tokenizer/vqgan.yaml."
        ) from error
    params = document.get("model", {}).get("params") if isinstance(document, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"{config_path} has no `model.params` mapping; pass Chameleon's tokenizer/vqgan.yaml.")

    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-checkpoint files
        raise ValueError(
            f"{checkpoint_path} could not be read as a torch checkpoint ({type(error).__name__}: {error}); "
            "pass Chameleon's tokenizer/vqgan.ckpt."
        ) from error
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{checkpoint_path} has no `state_dict` entry (a PyTorch Lightning checkpoint of taming's VQModel is "
            "expected); pass Chameleon's tokenizer/vqgan.ckpt."
        )
    return params, state_dict


def _whiten_transparency(image: Image.Image) -> Image.Image:
    """RGB as Chameleon saw it: transparent pixels blended onto white (float64, truncated to uint8), others as is."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0
    blended = (1 - alpha) * 255 + alpha * rgba[:, :, :3]
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def _load_image(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened
        except FileNotFoundError:
            raise
        except (OSError, Image.UnidentifiedImageError) as error:
            raise ValueError(
                f"{image} is not an image file PIL can read ({error}); pass a PNG, JPEG or other image file."
            ) from error
    if isinstance(image, Image.Image):
        return image
    raise TypeError(
        f"Expected a PIL image or an image file path, got {type(image).__name__}; for pixel tensors call "
        "`encode(pixel_values)` with a float tensor [batch, 3, height, width] in [-1, 1]."
    )


class ArmorVQGANModel(PreTrainedModel):
    """
    Chameleon's VQGAN: encoder -> quant_conv -> nearest codebook vector (no normalisation) -> post_quant_conv ->
    decoder. `encode` maps images to a grid of codes (one per `downsample_factor` x `downsample_factor` pixels),
    `decode` maps codes back to pixels; `forward` runs both with the straight-through estimator for training.
    """

    config_class = ArmorVQGANConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # Small enough to stay whole: the ARMOR model lists this class itself in its `_no_split_modules`.
    _no_split_modules = None

    def __init__(self, config: ArmorVQGANConfig):
        super().__init__(config)
        self.encoder = ChameleonVQVAEEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, kernel_size=1)
        self.quantize = ChameleonVQVAEVectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, kernel_size=1)
        self.decoder = ArmorVQGANDecoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module):
        """What a taming VQGAN starts from: PyTorch's default conv init, a codebook uniform in +-1/num_embeddings."""
        if isinstance(module, nn.Conv2d):
            bound = module.weight[0].numel() ** -0.5
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -1.0 / module.num_embeddings, 1.0 / module.num_embeddings)

    @classmethod
    def from_chameleon(cls, config_path: str | os.PathLike, checkpoint_path: str | os.PathLike) -> "ArmorVQGANModel":
        """
        Load Chameleon's released `tokenizer/vqgan.yaml` and `tokenizer/vqgan.ckpt`. The checkpoint's `loss.*`
        entries (discriminator, LPIPS) are dropped; every other key must match the model's keys and shapes exactly,
        unlike Chameleon's own `strict=False` load, which would hide a layout mistake.
        """
        params, state_dict = _read_chameleon_files(config_path, checkpoint_path)
        model = cls(vqgan_config_from_chameleon(params))
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("loss.")}
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = sorted(
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
            for key in set(expected) & set(state_dict)
            if state_dict[key].shape != expected[key].shape
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{checkpoint_path} does not match the VQGAN described by {config_path}: missing keys {missing[:10]} "
                f"({len(missing)} in all), unexpected keys {unexpected[:10]} ({len(unexpected)} in all), shape "
                f"mismatches {mismatched[:10]} ({len(mismatched)} in all). Pass the yaml and ckpt of the same release."
            )
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def preprocess(self, images, image_size: int | None = None) -> torch.Tensor:
        """
        PIL image(s) or image path(s) -> float32 [batch, 3, S, S] in [-1, 1], exactly as Chameleon's image tokenizer:
        transparency onto white, shorter side resized to S with LANCZOS, centre crop, x / 255 * 2 - 1.
        """
        size = self.config.resolution if image_size is None else image_size
        factor = self.config.downsample_factor
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % factor:
            raise ValueError(f"`image_size` must be a positive multiple of {factor} (the VQGAN's stride), got {size}.")
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("`images` is an empty list; pass at least one image.")
        else:
            images = [images]
        batch = []
        for image in images:
            image = _whiten_transparency(_load_image(image))
            scale = size / min(image.size)
            image = image.resize((round(scale * image.width), round(scale * image.height)), Image.Resampling.LANCZOS)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            pixels = np.asarray(image, dtype=np.float64) / 255.0 * 2 - 1
            batch.append(torch.from_numpy(pixels).permute(2, 0, 1).float())
        return torch.stack(batch)

    def _check_pixel_values(self, pixel_values: torch.Tensor):
        factor = self.config.downsample_factor
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`pixel_values` must be [batch, {self.config.in_channels}, height, width], got "
                f"{tuple(pixel_values.shape)}."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"`pixel_values` must be a float tensor in [-1, 1], got {pixel_values.dtype}.")
        if pixel_values.shape[2] % factor or pixel_values.shape[3] % factor:
            raise ValueError(
                f"Image height and width must be multiples of {factor} (the VQGAN's stride), got "
                f"{tuple(pixel_values.shape[2:])}; resize or crop, or pass PIL images to resize them for you."
            )

    def _quantize(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor]:
        """Pixels -> (straight-through quantized latents, embedding loss, codes [batch, rows, cols])."""
        latents = self.quant_conv(self.encoder(pixel_values))
        quantized, embedding_loss, indices = self.quantize(latents)
        return quantized, embedding_loss, indices.view(latents.shape[0], *latents.shape[2:])

    @torch.no_grad()
    def encode(self, images, image_size: int | None = None) -> torch.LongTensor:
        """
        Images -> codes [batch, rows, cols]. `images`: a PIL image, a path, a list of them (preprocessed to
        `image_size`, default `config.resolution`), or a float tensor [batch, 3, H, W] in [-1, 1] used as is.
        """
        if isinstance(images, torch.Tensor):
            if image_size is not None:
                raise ValueError("`image_size` only applies to PIL images; resize pixel tensors before `encode`.")
            pixel_values = images
        else:
            pixel_values = self.preprocess(images, image_size)
        self._check_pixel_values(pixel_values)
        return self._quantize(pixel_values.to(device=self.device, dtype=self.dtype))[2]

    def embed_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codes [batch, rows, cols] -> codebook vectors [batch, embed_dim, rows, cols], checked against the range."""
        num_embeddings = self.config.num_embeddings
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"`codes` must be an integer tensor [batch, rows, cols], got {type(codes).__name__}.")
        if codes.ndim == 2:
            codes = codes.unsqueeze(0)
        if codes.ndim != 3:
            raise ValueError(f"`codes` must be [batch, rows, cols] or [rows, cols], got shape {tuple(codes.shape)}.")
        invalid = codes[(codes < 0) | (codes >= num_embeddings)]
        if invalid.numel():
            raise ValueError(
                f"Code {invalid[0].item()} is outside the codebook range [0, {num_embeddings}); image codes are "
                f"token ids minus the image code offset."
            )
        return self.quantize.embedding(codes.to(self.device)).permute(0, 3, 1, 2).contiguous()

    def decode(self, codes: torch.LongTensor, output_type: str = "pt") -> torch.Tensor | list[Image.Image]:
        """
        Codes [batch, rows, cols] (or [rows, cols]) -> pixels [batch, 3, H, W] (`"pt"`, unclamped) or RGB PIL
        images (`"pil"`: clamp to [-1, 1], (x + 1) / 2 * 255, truncated to uint8, as Chameleon's `pil_from_img_toks`).
        """
        if output_type not in ("pt", "pil"):
            raise ValueError(f"`output_type` must be 'pt' or 'pil', got {output_type!r}.")
        pixels = self.decoder(self.post_quant_conv(self.embed_codes(codes)))
        if output_type == "pt":
            return pixels
        if pixels.shape[1] != 3:
            raise ValueError(f"`output_type='pil'` needs 3 output channels, this VQGAN has {pixels.shape[1]}.")
        images = ((pixels.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255).to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]

    def forward(self, pixel_values: torch.FloatTensor) -> ArmorVQGANOutput:
        """Encode, quantize and decode a batch in [-1, 1]; the reconstruction keeps gradients for VQGAN training."""
        self._check_pixel_values(pixel_values)
        quantized, embedding_loss, codes = self._quantize(pixel_values)
        reconstruction = self.decoder(self.post_quant_conv(quantized))
        return ArmorVQGANOutput(reconstruction=reconstruction, codes=codes, embedding_loss=embedding_loss)


__all__ = ["ArmorVQGANModel", "ArmorVQGANOutput", "vqgan_config_from_chameleon"]
