"""ArmorForConditionalGeneration: understanding parity, forward switching, losses, generation, checkpoints."""

import copy
import shutil

import pytest
import torch
from conftest import REPO_ROOT
from tiny_models import EOS, VOCAB_SIZE, image_prompt, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, GenerationConfig, InternVLConfig, InternVLForConditionalGeneration
from transformers.cache_utils import StaticCache

from armor.configuration_armor import ArmorConfig
from armor.modeling_armor import ArmorForConditionalGeneration, image_mode_mask

CODE_FILES = ("configuration_armor.py", "modeling_armor.py", "modeling_vqgan.py", "processing_armor.py")
N = 16  # codes per image in the tiny models
IMGBOS, IMGEND, IMGPAD, CODE0 = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2, VOCAB_SIZE + 3


def native_internvl(model: ArmorForConditionalGeneration) -> InternVLForConditionalGeneration:
    """transformers' own InternVL with the ARMOR model's base weights."""
    config = model.config
    native_config = InternVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        downsample_ratio=config.downsample_ratio,
        tie_word_embeddings=False,
    )
    native = InternVLForConditionalGeneration(native_config).eval()
    base_weights = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    missing, unexpected = native.load_state_dict(base_weights, strict=True)
    assert not missing and not unexpected
    return native


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_text_logits_equal_transformers_internvl(llm):
    model = tiny_model(llm)
    native = native_internvl(model)
    ids = image_prompt()
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, pixel_values=pixel_values).logits
        theirs = native(input_ids=ids, pixel_values=pixel_values).logits
        ours_text = model(ids[:, -5:]).logits
        theirs_text = native(input_ids=ids[:, -5:]).logits
    assert ours.shape[-1] == VOCAB_SIZE + 1
    assert (ours[..., :VOCAB_SIZE] - theirs).abs().max() <= 1e-5
    assert (ours_text[..., :VOCAB_SIZE] - theirs_text).abs().max() <= 1e-5
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero logits


def test_adapter_layers_are_the_llms_own_kind_and_follow_it_in_the_cache():
    model = tiny_model("llama")
    layer = model.adapter.layers[0]
    assert type(layer) is type(model.model.language_model.layers[0])
    assert [lay.self_attn.layer_idx for lay in model.adapter.layers] == [2, 3]
    assert model.image_token_embeddings.weight.shape == (3 + 64, 64)
    assert model.visual_head.weight.shape == (2 + 64, 64)
    assert model.imgbos_head.weight.shape == (1, 64)


@pytest.mark.parametrize("llm, decoder_layer", [("qwen2", "Qwen2DecoderLayer"), ("llama", "LlamaDecoderLayer")])
def test_no_split_modules_name_only_classes_the_model_holds(llm, decoder_layer):
    """FSDP auto-wrap (and device_map) look these names up in the model and fail on any it does not hold."""
    model = tiny_model(llm)
    held = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) == {decoder_layer, "InternVLVisionLayer", "ArmorVQGANModel"}
    assert set(model._no_split_modules) <= held


def test_image_mode_mask_is_the_switching_rule():
    config = tiny_config()
    ids = torch.tensor([[7, IMGBOS, CODE0, CODE0 + 63, IMGEND, 8, IMGPAD]])
    assert image_mode_mask(ids, config).tolist() == [[False, True, True, True, False, False, False]]


def test_cache_gives_the_same_logits_as_one_pass():
    model = tiny_model()
    ids = torch.tensor([[1, 7, 8, 9, IMGBOS, CODE0 + 5, CODE0 + 9, CODE0 + 1, IMGEND, 11]])
    with torch.no_grad():
        full = model(ids, use_cache=False)
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    assert (rest.logits - full.logits[:, 5:]).abs().max() < 1e-5
    assert (rest.image_logits - full.image_logits[:, 5:]).abs().max() < 1e-5


def test_text_logits_read_the_llm_and_the_imgbos_score_reads_the_adapter():
    model = tiny_model()
    ids = torch.tensor([[1, 7, 8, 9, IMGBOS, CODE0 + 5, IMGEND, 11]])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        hidden = model.model.language_model(
            inputs_embeds=model.embed_tokens(ids), position_ids=positions, use_cache=False
        ).last_hidden_state
        adapter_states = model.run_adapter(hidden, None, positions, None, False)
        assert torch.equal(logits[..., :VOCAB_SIZE], model.lm_head(hidden))
        assert torch.equal(logits[..., VOCAB_SIZE:], model.imgbos_head(adapter_states))
        assert not torch.isclose(logits[..., VOCAB_SIZE:], model.imgbos_head(hidden)).any()  # not the LLM's state
        for parameter in model.adapter.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        changed = model(ids, use_cache=False).logits
    assert torch.equal(changed[..., :VOCAB_SIZE], logits[..., :VOCAB_SIZE])  # understanding: bitwise the same
    assert not torch.isclose(changed[..., VOCAB_SIZE], logits[..., VOCAB_SIZE]).any()  # the decision moved


@pytest.mark.parametrize("static", [False, True])
def test_decode_steps_give_the_forwards_logits_and_without_the_adapter_no_imgbos(static):
    """`decode_step` as `generate` calls it, dynamic and static cache, against one pass over the whole sequence."""
    model = tiny_model(seed=3)
    ids = torch.tensor([[1, 7, 8, 9, IMGBOS, CODE0 + 5, CODE0 + 9, IMGEND, 11, 12]])
    prompt_length, mask = 4, torch.ones_like(ids)
    if static:
        cache = StaticCache(config=model.config.get_adapter_text_config(), max_cache_len=ids.shape[1])
    else:
        cache = model.new_cache()
    with torch.no_grad():
        full = model(ids, use_cache=False)
        model(
            ids[:, :prompt_length],
            attention_mask=mask if static else mask[:, :prompt_length],
            position_ids=torch.arange(prompt_length).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        )
        for step in range(prompt_length, ids.shape[1]):
            inputs = (ids[:, step : step + 1], torch.tensor([[step]]), mask if static else mask[:, : step + 1])
            text_only, no_image = model.decode_step(*inputs, copy.deepcopy(cache), True, False)
            text_logits, image_logits = model.decode_step(*inputs, cache, True, True)
            assert (text_logits - full.logits[:, step]).abs().max() < 1e-5
            assert (image_logits - full.image_logits[:, step]).abs().max() < 1e-5
            assert torch.equal(text_only[:, :VOCAB_SIZE], text_logits[:, :VOCAB_SIZE]) and no_image is None
            assert text_only[0, VOCAB_SIZE] == float("-inf")
    assert full.logits[0, prompt_length:, VOCAB_SIZE].abs().min() > 0.1  # a real score was compared


def make_labels(ids: torch.LongTensor, prompt_length: int) -> torch.LongTensor:
    labels = ids.clone()
    labels[:, :prompt_length] = -100
    return labels


def test_loss_routes_targets_by_id_and_weights_the_parts():
    model = tiny_model(text_loss_weight=0.3, image_loss_weight=2.0)
    ids = torch.tensor([[1, 7, 8, IMGBOS, CODE0 + 5, CODE0 + 9, IMGEND, 11, EOS]])
    labels = make_labels(ids, 2)
    out = model(ids, labels=labels)
    # Manual: positions 1..7 predict ids[2..8]; text targets 8, IMGBOS, 11, EOS; image targets two codes and IMGEND.
    text_positions, text_targets = [1, 2, 6, 7], [8, IMGBOS, 11, EOS]
    image_positions, image_targets = [3, 4, 5], [5 + 2, 9 + 2, 0]
    expected_text = torch.nn.functional.cross_entropy(out.logits[0, text_positions], torch.tensor(text_targets))
    expected_image = torch.nn.functional.cross_entropy(
        out.image_logits[0, image_positions], torch.tensor(image_targets)
    )
    assert torch.allclose(out.text_loss, expected_text, atol=1e-6)
    assert torch.allclose(out.image_loss, expected_image, atol=1e-6)
    assert torch.allclose(out.loss, 0.3 * expected_text + 2.0 * expected_image, atol=1e-6)


@pytest.mark.parametrize(
    ("text_weight", "image_weight", "silent", "moving"),
    [
        (0.0, 1.0, ("lm_head", "imgbos_head"), ("adapter", "visual_head", "image_token_embeddings")),
        # The text loss reaches the adapter through the <imgbos> score, which reads the adapter's output.
        (1.0, 0.0, ("visual_head",), ("imgbos_head", "adapter", "lm_head", "image_token_embeddings")),
    ],
)
def test_a_zero_loss_weight_sends_no_gradient_to_its_head(text_weight, image_weight, silent, moving):
    model = tiny_model(text_loss_weight=text_weight, image_loss_weight=image_weight).train()
    ids = torch.tensor([[1, 7, 8, IMGBOS, CODE0 + 5, CODE0 + 9, IMGEND, 11, EOS]])
    model(ids, labels=make_labels(ids, 2)).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith(silent):
            assert parameter.grad is None, name
    for prefix in moving:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix


# ------------------------------------------------------------------------------------------------ generation


def greedy_without_cache(model, ids: torch.LongTensor, max_new_tokens: int) -> list[int]:
    """The switching rule applied by re-running the whole sequence each step: the reference for cached decoding."""
    codes_done = 0 if ids[0, -1] == IMGBOS else -1
    out = ids
    for _ in range(max_new_tokens):
        with torch.no_grad():
            result = model(out, use_cache=False)
        if codes_done == N:
            token, codes_done = IMGEND, -1
        elif codes_done >= 0:
            token, codes_done = int(result.image_logits[0, -1, 2:].argmax()) + CODE0, codes_done + 1
        else:
            scores = result.logits[0, -1].clone()
            remaining = max_new_tokens - (out.shape[1] - ids.shape[1])
            if remaining < N + 2:
                scores[IMGBOS] = float("-inf")
            token = int(scores.argmax())
            codes_done = 0 if token == IMGBOS else -1
        out = torch.cat([out, torch.tensor([[token]])], dim=1)
        if token == EOS and codes_done < 0:
            break
    return out[0, ids.shape[1] :].tolist()


def greedy(model, ids, **kwargs):
    return model.generate(ids, do_sample=False, image_do_sample=False, **kwargs)[0, ids.shape[1] :].tolist()


def test_image_only_answer_is_imgbos_codes_imgend():
    model = tiny_model()
    answer = model.generate(
        image_prompt(), pixel_values=torch.randn(1, 3, 448, 448), max_new_tokens=40, modality="image", seed=0
    )[0, -(N + 3) :].tolist()
    assert answer[0] == IMGBOS and answer[N + 1] == IMGEND and answer[N + 2] == EOS
    assert all(CODE0 <= token < CODE0 + 64 for token in answer[1 : N + 1])
    images = model.vqgan.decode(torch.tensor(answer[1 : N + 1]).view(1, 4, 4) - CODE0, output_type="pil")
    assert images[0].size == (8, 8) == (model.config.generated_image_size,) * 2


def test_text_only_answer_never_opens_an_image():
    model = tiny_model()
    with torch.no_grad():
        model.imgbos_head.weight.copy_(model.lm_head.weight.sum(0, keepdim=True) * 0 + 5.0)
    ids = torch.tensor([[1, 7, 8, 9]])
    assert IMGBOS in greedy(model, ids, max_new_tokens=30)  # the biased model wants an image...
    answer = greedy(model, ids, max_new_tokens=30, modality="text")
    assert IMGBOS not in answer and all(token < VOCAB_SIZE for token in answer)  # ...and is not allowed one


def test_text_modality_answers_exactly_as_the_base_model_whatever_the_adapter():
    model = tiny_model(seed=1)
    with torch.no_grad():  # an adapter and <imgbos> row that make the model want an image...
        model.imgbos_head.weight.mul_(3.0)
        for parameter in model.adapter.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    native = native_internvl(model)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    assert IMGBOS in greedy(model, ids, max_new_tokens=40)
    answer = greedy(model, ids, max_new_tokens=40, modality="text")  # ...answers as the base model does
    base = native.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    assert answer == base[0, ids.shape[1] :].tolist() and len(answer) > 3


def test_static_cache_generation_equals_dynamic_cache_generation():
    """Both caches hold the adapter's layers; the adapter runs at every step, text steps included."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.imgbos_head.weight.mul_(3.0)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    dynamic = greedy(model, ids, max_new_tokens=45)
    assert IMGBOS in dynamic and dynamic.index(IMGBOS) > 0  # text, then an image: <imgbos> read from a decode step
    assert greedy(model, ids, max_new_tokens=45, cache_implementation="static") == dynamic


def test_a_text_only_batch_still_draws_the_image_a_prompt_opened():
    """`modality="text"` skips the adapter only while no row can draw; a prompt ending in `<imgbos>` draws."""
    model = tiny_model(seed=2)
    batch = torch.tensor([[1, 7, 8, 9, 10], [1, 7, 8, 9, IMGBOS]])
    answers = model.generate(batch, do_sample=False, image_do_sample=False, max_new_tokens=N + 4, modality="text")
    opened = answers[1, batch.shape[1] :].tolist()
    assert opened[: N + 1] == greedy(model, batch[1:], max_new_tokens=N + 1) and opened[N] == IMGEND
    assert IMGBOS not in answers[0].tolist()


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_greedy_cached_generation_equals_greedy_without_cache(llm):
    model = tiny_model(llm, seed=3)
    with torch.no_grad():  # make <imgbos> likely so that both modes are exercised
        model.imgbos_head.weight.mul_(3.0)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    reference = greedy_without_cache(model, ids, 45)
    assert greedy(model, ids, max_new_tokens=45) == reference
    prompt_in_image_mode = torch.tensor([[1, 7, 8, IMGBOS]])
    reference = greedy_without_cache(model, prompt_in_image_mode, N + 3)
    answer = greedy(model, prompt_in_image_mode, max_new_tokens=N + 3)
    assert answer == reference and answer[N] == IMGEND and all(t >= CODE0 for t in answer[:N])


def test_an_image_is_never_cut_short_by_max_new_tokens():
    model = tiny_model()
    with torch.no_grad():
        model.imgbos_head.weight.copy_(model.lm_head.weight.sum(0, keepdim=True) * 0 + 5.0)
    ids = torch.tensor([[1, 7, 8, 9]])
    for max_new_tokens in (N + 1, N + 2, N + 10, 2 * N + 3):
        answer = greedy(model, ids, max_new_tokens=max_new_tokens)
        opened, closed = answer.count(IMGBOS), answer.count(IMGEND)
        assert opened == closed, (max_new_tokens, answer)
    assert IMGBOS not in greedy(model, ids, max_new_tokens=N + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=N, modality="image")


def test_guidance_scale_one_equals_no_guidance_and_other_scales_follow_the_cfg_formula():
    model = tiny_model(seed=5)
    ids = torch.tensor([[1, 7, 8, 9, IMGBOS]])
    plain = model.generate(ids, max_new_tokens=N + 1, seed=11)
    assert torch.equal(plain, model.generate(ids, max_new_tokens=N + 1, seed=11, guidance_scale=1.0))
    scale = 4.0
    guided = greedy(model, ids, max_new_tokens=N + 1, guidance_scale=scale)
    with torch.no_grad():
        cond = model(ids).image_logits[0, -1, 2:]
        uncond = model(torch.tensor([[IMGPAD] * 4 + [IMGBOS]])).image_logits[0, -1, 2:]
    assert guided[0] == int((uncond + scale * (cond - uncond)).argmax()) + CODE0
    assert guided[0] != int(cond.argmax()) + CODE0 or scale == 1  # guidance changed the choice here


def test_negative_prompt_is_the_unconditional_context():
    model = tiny_model(seed=5)
    ids = torch.tensor([[1, 7, 8, 9, IMGBOS]])
    negative = torch.tensor([[1, 30, IMGBOS]])
    guided = greedy(model, ids, max_new_tokens=N + 1, guidance_scale=3.0, negative_prompt_ids=negative)
    with torch.no_grad():
        cond = model(ids).image_logits[0, -1, 2:]
        uncond = model(negative).image_logits[0, -1, 2:]
    assert guided[0] == int((uncond + 3.0 * (cond - uncond)).argmax()) + CODE0


def test_each_row_of_a_batch_gets_what_it_gets_alone_with_the_same_seed():
    model = tiny_model(seed=2)
    with torch.no_grad():
        model.imgbos_head.weight.mul_(3.0)
    prompts = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 7, 8, IMGBOS]]
    settings = {"max_new_tokens": 40, "do_sample": True, "temperature": 1.5, "guidance_scale": 2.0}
    alone = [model.generate(torch.tensor([p]), seed=7, **settings)[0, len(p) :].tolist() for p in prompts]
    length = max(map(len, prompts))
    batch = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    together = model.generate(batch, attention_mask=mask, seed=7, **settings)[:, length:].tolist()
    pad = model.generation_config.eos_token_id
    for row, expected in zip(together, alone):
        assert row[: len(expected)] == expected
        assert all(token == pad for token in row[len(expected) :])
    assert any(IMGEND in row for row in alone) and any(IMGEND not in row for row in alone)  # mixed modes


def test_generation_options_are_checked():
    model = tiny_model()
    ids = torch.tensor([[1, 7]])
    for bad, match in [
        ({"modality": "video"}, "modality"),
        ({"image_temperature": 0.0}, "image_temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"cache_implementation": "paged"}, "cache_implementation"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.generate(ids, **{"max_new_tokens": 4, **bad})
    with pytest.raises(TypeError, match="unknown"):
        model.generate(ids, max_new_tokens=4, not_an_option=1)


def test_more_image_context_tokens_than_tiles_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model(image_prompt(num_tiles=2), pixel_values=torch.randn(1, 3, 448, 448))


# ------------------------------------------------------------------------------------------------- checkpoints


def test_save_pretrained_then_automodel_with_remote_code_gives_identical_weights_and_logits(tmp_path):
    model = tiny_model()
    ArmorConfig.register_for_auto_class()
    ArmorForConditionalGeneration.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path)
    for name in CODE_FILES:  # a Hub repo holds every code file, the processor's too
        if not (tmp_path / name).exists():
            shutil.copy(REPO_ROOT / name, tmp_path / name)
    assert (tmp_path / "vqgan" / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path, trust_remote_code=True).model_type == "armor"
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "ArmorForConditionalGeneration"
    assert loaded.generation_config.eos_token_id == EOS
    ids, pixel_values = image_prompt(), torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        expected = model(ids, pixel_values=pixel_values)
        actual = loaded(ids, pixel_values=pixel_values)
        codes = torch.randint(0, 64, (1, 4, 4))
        assert torch.equal(loaded.vqgan.decode(codes), model.vqgan.decode(codes))
    # The round trip is exact in the weights; the two instances' kernels may sum in another order (seen: 1e-7).
    assert all(torch.equal(tensor, loaded.state_dict()[name]) for name, tensor in model.state_dict().items())
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.image_logits, expected.image_logits, rtol=0, atol=1e-6)


def test_every_load_reads_the_checkpoints_generation_config(tmp_path):
    model = tiny_model()
    model.generation_config = GenerationConfig(
        eos_token_id=EOS, modality="image", guidance_scale=2.5, image_top_k=7, max_new_tokens=99
    )
    ArmorConfig.register_for_auto_class()
    ArmorForConditionalGeneration.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path)
    for name in CODE_FILES:
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    for _ in range(2):  # the second load in a process once fell back to defaults built from the config
        loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
        settings = loaded.generation_config
        assert (settings.modality, settings.guidance_scale, settings.image_top_k) == ("image", 2.5, 7)
        assert settings.max_new_tokens == 99


def test_a_checkpoint_without_vqgan_folder_is_refused(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "vqgan")
    with pytest.raises(OSError, match="vqgan/"):
        ArmorForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image_codebook_size": 100}, "image_codebook_size"),
        ({"num_image_codes": 1000}, "num_image_codes"),
        ({"imgbos_token_id": 3}, "imgbos_token_id"),
        ({"num_adapter_layers": 0}, "num_adapter_layers"),
        ({"image_loss_weight": -1.0}, "image_loss_weight"),
        ({"image_seq_length": 100}, "image_seq_length"),
    ],
)
def test_impossible_configs_fail_at_construction_naming_the_field(overrides, field):
    with pytest.raises(Exception, match=field):
        tiny_config(**overrides)


def test_256_codes_per_image_is_supported():
    config = tiny_config(
        num_image_codes=256,
        vqgan_config={**tiny_config().vqgan_config.to_dict(), "channel_multiplier": [1, 1, 1, 1, 2]},
    )
    assert config.image_grid_size == 16 and config.generated_image_size == 256


def test_chat_answers_like_internvl_with_text_and_segments():
    from conftest import FIXTURES

    from armor.convert_tokenizer import convert_tokenizer

    tokenizer = convert_tokenizer(FIXTURES / "internvl2_5-tiny-qwen2", vocab_size=1012)
    model = tiny_model(vocab_size=1012, image_token_id=1005, image_start_token_id=1003, image_end_token_id=1004)
    pixel_values = torch.randn(2, 3, 448, 448)
    answer, history = model.chat(
        tokenizer, pixel_values, "Describe.", {"max_new_tokens": 60, "do_sample": False}, return_history=True
    )
    assert isinstance(answer, str) and answer.segments
    assert answer == "".join(s for s in answer.segments if isinstance(s, str)).strip()
    assert history == [("<image>\nDescribe.", str(answer))]
    answers = model.batch_chat(
        tokenizer, pixel_values, ["One?", "Two?"], {"max_new_tokens": 8}, num_patches_list=[1, 1]
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="tiles"):
        model.chat(tokenizer, pixel_values, "Describe.", {"max_new_tokens": 4}, num_patches_list=[1])
