"""ArmorVQGANModel against Chameleon's reference VQGAN, with the data in tests/fixtures/chameleon-vqgan-tiny*/."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from armor.configuration_armor import ArmorVQGANConfig
from armor.modeling_vqgan import ArmorVQGANModel, vqgan_config_from_chameleon

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_NAMES = ["chameleon-vqgan-tiny", "chameleon-vqgan-tiny-attn"]
DECOYS = [
    "loss.discriminator.main.0.weight",
    "loss.discriminator.main.0.bias",
    "loss.perceptual_loss.lin0.model.1.weight",
]


class Reference:
    """One fixture folder: the model loaded from Chameleon's files, the stored tensors, and the slow 512px results."""

    def __init__(self, name: str):
        self.folder = FIXTURES / name
        self.model = ArmorVQGANModel.from_chameleon(self.folder / "vqgan.yaml", self.folder / "vqgan.ckpt")
        self.tensors = load_file(self.folder / "inputs_and_outputs.safetensors")
        self.pil_input = Image.open(self.folder / "pil_input.png")
        self.pil_pixels = self.model.preprocess(self.pil_input, image_size=512)
        self.pil_codes = self.model.encode(self.pil_input, image_size=512)
        with torch.no_grad():
            self.pil_image = self.model.decode(self.tensors["pil_tokens"].view(32, 32), output_type="pil")[0]


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def ref(request) -> Reference:
    return Reference(request.param)


@pytest.fixture(scope="module")
def tiny() -> ArmorVQGANModel:
    folder = FIXTURES / "chameleon-vqgan-tiny"
    return ArmorVQGANModel.from_chameleon(folder / "vqgan.yaml", folder / "vqgan.ckpt")


# ---------------------------------------------------------------------------------------------- loading Chameleon


def test_from_chameleon_loads_every_model_key_and_ignores_loss_decoys(ref):
    checkpoint = torch.load(ref.folder / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(key in checkpoint for key in DECOYS)
    model_keys = {key for key in checkpoint if not key.startswith("loss.")}
    state = ref.model.state_dict()
    assert set(state) == model_keys
    assert all(torch.equal(state[key], checkpoint[key]) for key in model_keys)
    assert not ref.model.training


def test_yaml_params_map_to_config_fields(ref):
    config = ref.model.config
    assert (config.embed_dim, config.num_embeddings, config.latent_channels, config.base_channels) == (16, 64, 16, 32)
    assert list(config.channel_multiplier) == [1, 1, 2, 2, 4]
    assert (config.resolution, config.num_res_blocks, config.out_channels, config.double_latent) == (64, 1, 3, False)
    assert list(config.attn_resolutions) == ([4] if ref.folder.name.endswith("-attn") else [])
    assert config.downsample_factor == 16


def test_attention_blocks_sit_where_attn_resolutions_says(ref):
    with_attention = ref.folder.name.endswith("-attn")
    assert [len(level.attn) for level in ref.model.encoder.down] == [0, 0, 0, 0, 1 if with_attention else 0]
    assert [len(level.attn) for level in ref.model.decoder.up] == [0, 0, 0, 0, 2 if with_attention else 0]
    assert [len(level.block) for level in ref.model.decoder.up] == [2] * 5


def test_released_chameleon_hyperparameters_give_the_default_config():
    released = {
        "embed_dim": 256,
        "n_embed": 8192,
        "ddconfig": {
            "double_z": False, "z_channels": 256, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
        },
    }  # fmt: skip
    config, default = vqgan_config_from_chameleon(released), ArmorVQGANConfig()
    for field in ("embed_dim", "num_embeddings", "latent_channels", "resolution", "base_channels", "num_res_blocks"):
        assert getattr(config, field) == getattr(default, field)
    assert list(config.channel_multiplier) == list(default.channel_multiplier)


# ------------------------------------------------------------------------------------------ numbers vs reference


def test_encoder_and_quant_conv_match_reference(ref):
    with torch.no_grad():
        encoder_out = ref.model.encoder(ref.tensors["x"])
        pre_quant = ref.model.quant_conv(encoder_out)
    assert (encoder_out - ref.tensors["encoder_out"]).abs().max() < 1e-4
    assert (pre_quant - ref.tensors["pre_quant"]).abs().max() < 1e-4


def test_encode_tensor_gives_reference_indices_as_a_grid(ref):
    codes = ref.model.encode(ref.tensors["x"])
    assert codes.shape == (1, 4, 4) and codes.dtype == torch.long
    assert torch.equal(codes.flatten(), ref.tensors["indices"])


def test_codebook_entry_is_exact_and_decode_matches_reference(ref):
    codes = ref.tensors["indices"].view(1, 4, 4)
    with torch.no_grad():
        assert torch.equal(ref.model.embed_codes(codes), ref.tensors["codebook_entry"])
        decoded = ref.model.decode(codes)
        decoded_2d = ref.model.decode(codes[0])
    assert decoded.shape == (1, 3, 64, 64)
    assert (decoded - ref.tensors["decoded"]).abs().max() < 1e-4
    assert torch.equal(decoded, decoded_2d)


def test_forward_reconstruction_matches_reference_and_trains_the_encoder(ref):
    output = ref.model(ref.tensors["x"])
    assert (output.reconstruction - ref.tensors["forward_recon"]).abs().max() < 1e-4
    assert torch.equal(output.codes.flatten(), ref.tensors["indices"])
    assert output.embedding_loss.ndim == 0 and output.embedding_loss > 0
    (output.reconstruction.square().mean() + output.embedding_loss).backward()
    assert ref.model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator passes gradients
    assert ref.model.quantize.embedding.weight.grad.abs().sum() > 0
    ref.model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------- PIL round trip


def test_preprocess_reproduces_chameleon_pil_pipeline(ref):
    expected = np.asarray(Image.open(ref.folder / "pil_preprocessed_512.png"))
    assert ref.pil_pixels.shape == (1, 3, 512, 512) and ref.pil_pixels.dtype == torch.float32
    as_uint8 = ((ref.pil_pixels[0].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(as_uint8, expected)
    assert torch.equal(ref.pil_pixels[0], torch.from_numpy(expected / 255.0 * 2 - 1).permute(2, 0, 1).float())


def test_encode_pil_gives_reference_tokens(ref):
    assert ref.pil_codes.shape == (1, 32, 32)
    assert torch.equal(ref.pil_codes.flatten(), ref.tensors["pil_tokens"])


def test_decode_to_pil_matches_reference_image(ref):
    expected = np.asarray(Image.open(ref.folder / "pil_output.png")).astype(np.int16)
    assert ref.pil_image.mode == "RGB" and ref.pil_image.size == (512, 512)
    assert np.abs(np.asarray(ref.pil_image).astype(np.int16) - expected).max() <= 1


def test_image_path_and_list_inputs_match_pil_input(tiny):
    path = FIXTURES / "chameleon-vqgan-tiny" / "pil_input.png"
    image = Image.open(path)
    single = tiny.preprocess(image, image_size=64)
    assert torch.equal(tiny.preprocess(path, image_size=64), single)
    assert torch.equal(tiny.preprocess([str(path), image], image_size=64), torch.cat([single, single]))


def test_256px_images_give_16x16_grids_and_decode_back_to_256px(tiny):
    codes = tiny.encode(FIXTURES / "chameleon-vqgan-tiny" / "pil_input.png", image_size=256)
    assert codes.shape == (1, 16, 16)
    with torch.no_grad():
        pixels = tiny.decode(codes)
    assert pixels.shape == (1, 3, 256, 256)
    assert tiny.encode(torch.zeros(2, 3, 32, 48)).shape == (2, 2, 3)


def test_default_image_size_is_config_resolution(tiny):
    assert tiny.preprocess(Image.new("RGB", (100, 70))).shape == (1, 3, 64, 64)


def test_save_pretrained_round_trip_gives_identical_decode(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "vqgan")
    assert (tmp_path / "vqgan" / "model.safetensors").is_file()
    reloaded = ArmorVQGANModel.from_pretrained(tmp_path, subfolder="vqgan")
    assert reloaded.config.model_type == "armor_vqgan"
    assert list(reloaded.config.channel_multiplier) == [1, 1, 2, 2, 4]
    codes = torch.arange(32).view(2, 4, 4)
    with torch.no_grad():
        assert torch.equal(reloaded.decode(codes), tiny.decode(codes))


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad_code", [64, -1])
def test_decode_rejects_codes_outside_the_codebook(tiny, bad_code):
    codes = torch.zeros(1, 4, 4, dtype=torch.long)
    codes[0, 2, 3] = bad_code
    with pytest.raises(ValueError, match=rf"Code {bad_code} is outside the codebook range \[0, 64\)"):
        tiny.decode(codes)


def test_decode_rejects_unknown_output_type_and_float_codes(tiny):
    with pytest.raises(ValueError, match="output_type"):
        tiny.decode(torch.zeros(4, 4, dtype=torch.long), output_type="np")
    with pytest.raises(TypeError, match="integer tensor"):
        tiny.decode(torch.zeros(4, 4))


def test_non_image_file_and_non_image_object_are_rejected(tiny, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("plain text")
    with pytest.raises(ValueError, match="notes.png is not an image file"):
        tiny.encode(not_an_image)
    with pytest.raises(TypeError, match="Expected a PIL image"):
        tiny.preprocess(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="Expected a PIL image"):
        tiny.encode([Image.new("RGB", (64, 64)), 3])


def test_encode_rejects_sizes_that_are_not_multiples_of_the_stride(tiny):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.encode(torch.zeros(1, 3, 64, 40))
    with pytest.raises(ValueError, match="positive multiple of 16"):
        tiny.preprocess(Image.new("RGB", (64, 64)), image_size=100)
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        tiny.encode(torch.zeros(3, 64, 64))


def test_from_chameleon_names_a_missing_file(tmp_path):
    folder = FIXTURES / "chameleon-vqgan-tiny"
    with pytest.raises(FileNotFoundError, match="nothing.ckpt does not exist"):
        ArmorVQGANModel.from_chameleon(folder / "vqgan.yaml", tmp_path / "nothing.ckpt")
    with pytest.raises(FileNotFoundError, match="nothing.yaml does not exist"):
        ArmorVQGANModel.from_chameleon(tmp_path / "nothing.yaml", folder / "vqgan.ckpt")


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("missing", r"missing keys \['decoder.up.0.block.1.conv2.weight'\]"),
        ("unexpected", r"unexpected keys \['decoder.extra.weight'\]"),
        ("mismatched", r"quant_conv.bias: checkpoint \(17,\) vs model \(16,\)"),
    ],
)
def test_from_chameleon_rejects_a_checkpoint_that_does_not_match(tmp_path, corruption, message):
    folder = FIXTURES / "chameleon-vqgan-tiny"
    checkpoint = torch.load(folder / "vqgan.ckpt", map_location="cpu", weights_only=True)
    state_dict = checkpoint["state_dict"]
    if corruption == "missing":
        del state_dict["decoder.up.0.block.1.conv2.weight"]
    elif corruption == "unexpected":
        state_dict["decoder.extra.weight"] = torch.zeros(1)
    else:
        state_dict["quant_conv.bias"] = torch.zeros(17)
    torch.save(checkpoint, tmp_path / "vqgan.ckpt")
    with pytest.raises(ValueError, match=message):
        ArmorVQGANModel.from_chameleon(folder / "vqgan.yaml", tmp_path / "vqgan.ckpt")


def test_from_chameleon_rejects_files_of_the_wrong_kind(tmp_path):
    folder = FIXTURES / "chameleon-vqgan-tiny"
    (tmp_path / "no_params.yaml").write_text("model:\n  target: taming.models.vqgan.VQModel\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "corrupt.ckpt").write_bytes(b"definitely not a checkpoint")
    torch.save({"epoch": 0}, tmp_path / "no_state_dict.ckpt")
    cases = [
        (tmp_path / "no_params.yaml", folder / "vqgan.ckpt", "has no `model.params`"),
        (tmp_path / "binary.yaml", folder / "vqgan.ckpt", "binary.yaml is not a YAML file"),
        (folder / "vqgan.yaml", tmp_path / "corrupt.ckpt", "corrupt.ckpt could not be read as a torch checkpoint"),
        (folder / "vqgan.yaml", tmp_path / "no_state_dict.ckpt", "no_state_dict.ckpt has no `state_dict`"),
    ]
    for config_path, checkpoint_path, message in cases:
        with pytest.raises(ValueError, match=message):
            ArmorVQGANModel.from_chameleon(config_path, checkpoint_path)


def test_taming_options_that_change_the_network_are_rejected():
    params = {"embed_dim": 16, "n_embed": 64, "ddconfig": {"ch": 32, "ch_mult": [1, 2], "tanh_out": True}}
    with pytest.raises(ValueError, match=r"unsupported values for \['tanh_out'\]"):
        vqgan_config_from_chameleon(params)
    params["ddconfig"] = {"ch": 32, "ch_mult": [1, 2], "z_chanels": 16}
    with pytest.raises(ValueError, match=r"unknown keys \['z_chanels'\]"):
        vqgan_config_from_chameleon(params)
    with pytest.raises(ValueError, match="need `embed_dim`, `n_embed` and a `ddconfig`"):
        vqgan_config_from_chameleon({"embed_dim": 16})
