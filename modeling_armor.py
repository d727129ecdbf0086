"""ARMOR: an InternVL2.5 model that also draws, autoregressively, in text-image interleaved answers (arXiv 2503.06542).

The understanding path is transformers' own `InternVLModel` (vision tower, pixel-shuffle projector, LLM) and the
LLM's own output head, untouched. ARMOR adds, beside them:

* `image_token_embeddings`: input embeddings of `<imgbos>`, `<imgend>`, `<imgpad>` and the VQGAN codes (ids >= V);
* `adapter`: decoder layers of the LLM's own kind on top of the LLM's last hidden state, with their own norm;
* `visual_head`: scores `<imgend>`, `<imgpad>` and the codes from the adapter's output;
* `imgbos_head`: the `<imgbos>` score, a column beside the LLM's output head that reads the adapter's output.

So the first V text logits are exactly the base model's, and training that leaves the base weights frozen cannot
change what the model understands. The `<imgbos>` score reads the adapter rather than the LLM's last hidden state
because deciding to draw needs the prompt ("... Show me.") at the end of an answer, and with the LLM frozen its last
state there does not carry it; the adapter's trainable layers attend over the whole context.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, InternVLModel, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import (
    ClassifierFreeGuidanceLogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import ModelOutput

from .configuration_armor import ArmorConfig
from .modeling_vqgan import ArmorVQGANModel

MODALITIES = ("auto", "text", "image")


@dataclass
class ArmorCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*):
        `text_loss_weight * text_loss + image_loss_weight * image_loss`, returned when `labels` are given.
    text_loss (`torch.FloatTensor`, *optional*):
        Cross-entropy over the positions whose target is a text-head id (`[0, V]`).
    image_loss (`torch.FloatTensor`, *optional*):
        Cross-entropy over the positions whose target is a visual-head id (`<imgend>`, `<imgpad>`, codes).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, V + 1)`):
        Text head: the base LLM's logits over its vocabulary, then the `<imgbos>` score (from the adapter's output).
    image_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, K + 2)`):
        Visual head: scores of `<imgend>`, `<imgpad>`, then the K codes (token ids `V + 1 ...`).
    past_key_values (`Cache`, *optional*):
        One cache for the LLM's layers and the adapter's, which follow them (layer indices `L .. L + N - 1`).
    image_hidden_states (`torch.FloatTensor`, *optional*):
        Projected vision features that replaced the `<IMG_CONTEXT>` embeddings.
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    image_hidden_states: torch.FloatTensor | None = None


def image_mode_mask(input_ids: torch.LongTensor, config: ArmorConfig) -> torch.BoolTensor:
    """The forward-switching rule: a position whose token is `<imgbos>` or a code predicts with the visual head.

    Every other position (text, `<imgend>`, `<imgpad>`) predicts with the text head. Training routes targets by the
    same rule (a target id > V belongs to the visual head) and `generate` applies it step by step.
    """
    return (input_ids == config.imgbos_token_id) | (input_ids >= config.image_code_offset)


class ArmorAdapter(nn.Module):
    """Decoder layers of the LLM's own kind that turn the LLM's last hidden state into the visual head's input.

    They sit at layer indices `L .. L + N - 1` of the LLM's cache, so one cache serves the whole model, and they see
    every earlier position (text ones included), as the paper's adapter does.
    """

    def __init__(self, config: ArmorConfig, decoder_layer_class: type[nn.Module], norm_class: type[nn.Module]):
        super().__init__()
        adapter_config = config.get_adapter_text_config()
        first_layer = config.text_config.num_hidden_layers
        self.layers = nn.ModuleList(
            [decoder_layer_class(adapter_config, first_layer + i) for i in range(config.num_adapter_layers)]
        )
        self.norm = norm_class(config.text_config.hidden_size, eps=config.text_config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.LongTensor,
        past_key_values: Cache | None,
        use_cache: bool,
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        return self.norm(hidden_states)


class ArmorPreTrainedModel(PreTrainedModel):
    config: ArmorConfig
    config_class = ArmorConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The vision and decoder layer classes come from the submodels (`post_init` gathers theirs), so that FSDP's
    # auto-wrap only sees classes this model holds.
    _no_split_modules = ["ArmorVQGANModel"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The VQGAN's weights live in the checkpoint's `vqgan/` folder, not in the main safetensors.
    _keys_to_ignore_on_load_missing = [r"^vqgan\."]
    _keep_in_fp32_modules = ["vqgan"]

    @classmethod
    def can_generate(cls) -> bool:
        """ARMOR generates with its own loop (forward switching), not `GenerationMixin`."""
        return True


class ArmorForConditionalGeneration(ArmorPreTrainedModel):
    def __init__(self, config: ArmorConfig):
        super().__init__(config)
        text_config = config.text_config
        hidden_size = text_config.hidden_size
        self.model = InternVLModel(config)
        self.lm_head = nn.Linear(hidden_size, text_config.vocab_size, bias=False)
        self.imgbos_head = nn.Linear(hidden_size, 1, bias=False)
        self.image_token_embeddings = nn.Embedding(3 + config.image_codebook_size, hidden_size)
        language_model = self.model.language_model
        self.adapter = ArmorAdapter(config, type(language_model.layers[0]), type(language_model.norm))
        self.visual_head = nn.Linear(hidden_size, 2 + config.image_codebook_size, bias=False)
        self.vqgan = ArmorVQGANModel(config.vqgan_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ------------------------------------------------------------------------------------------------- forward

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Ids below V use the LLM's table; ARMOR's ids (specials and codes) use `image_token_embeddings`."""
        vocab_size = self.config.text_config.vocab_size
        is_armor_token = input_ids >= vocab_size
        text_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_armor_token, 0))
        armor_embeds = self.image_token_embeddings((input_ids - vocab_size).clamp(min=0))
        return torch.where(is_armor_token.unsqueeze(-1), armor_embeds.to(text_embeds.dtype), text_embeds)

    def merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, pixel_values: torch.FloatTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the `<IMG_CONTEXT>` embeddings, in order, by the projected ViT features of the tiles."""
        image_features = self.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder_mask = input_ids == self.config.image_token_id
        if placeholder_mask.sum() != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(
                f"The prompt holds {int(placeholder_mask.sum())} <IMG_CONTEXT> tokens but pixel_values give "
                f"{image_features.shape[0]} tiles x {image_features.shape[1]} features; build prompts with "
                "ArmorProcessor, which expands each <image> to 256 <IMG_CONTEXT> per tile."
            )
        mask = placeholder_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features), image_features

    def text_head(self, hidden_states: torch.Tensor, adapter_states: torch.Tensor | None) -> torch.Tensor:
        """Scores of ids `[0, V]`: the LLM's own head on its last hidden states, then `<imgbos>` on the adapter's.

        Without adapter states (`None`: the adapter did not run, so no image can follow) `<imgbos>` scores `-inf`.
        """
        text_logits = self.lm_head(hidden_states)
        if adapter_states is None:
            imgbos_logits = text_logits.new_full((*text_logits.shape[:-1], 1), float("-inf"))
        else:
            imgbos_logits = self.imgbos_head(adapter_states)
        return torch.cat([text_logits, imgbos_logits], dim=-1)

    def run_adapter(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        past_key_values: Cache | None,
        use_cache: bool,
    ) -> torch.Tensor:
        """The adapter over the LLM's last hidden states, its mask sized by its own (not yet updated) cache layers."""
        adapter_mask = create_causal_mask(
            config=self.adapter.layers[0].self_attn.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            layer_idx=self.config.text_config.num_hidden_layers,
        )
        position_embeddings = self.model.language_model.rotary_emb(hidden_states, position_ids=position_ids)
        return self.adapter(hidden_states, adapter_mask, position_embeddings, position_ids, past_key_values, use_cache)

    def new_cache(self) -> DynamicCache:
        """A cache with room for the LLM's layers and the adapter's."""
        return DynamicCache(config=self.config.get_adapter_text_config())

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> ArmorCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids in ARMOR's id space: the LLM vocabulary, then `<imgbos>`, `<imgend>`, `<imgpad>`, the codes.
        pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, 448, 448)`, *optional*):
            Input image tiles; their features replace the `<IMG_CONTEXT>` tokens in order.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets aligned with `input_ids` (shifted inside); `-100` is ignored. Ids `<= V` train the text head,
            larger ids the visual head.
        logits_to_keep (`int`, *optional*, defaults to 0):
            Compute head logits only for the last `logits_to_keep` positions (0: all).
        """
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) + past_seen

        inputs_embeds = self.embed_tokens(input_ids)
        image_features = None
        if pixel_values is not None:
            inputs_embeds, image_features = self.merge_image_features(input_ids, inputs_embeds, pixel_values)

        hidden_states = self.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        ).last_hidden_state
        adapter_states = self.run_adapter(hidden_states, attention_mask, position_ids, past_key_values, use_cache)

        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.text_head(hidden_states[:, keep], adapter_states[:, keep])
        image_logits = self.visual_head(adapter_states[:, keep])

        loss = text_loss = image_loss = None
        if labels is not None:
            loss, text_loss, image_loss = self.loss_function_armor(logits, image_logits, labels)

        return ArmorCausalLMOutputWithPast(
            loss=loss,
            text_loss=text_loss,
            image_loss=image_loss,
            logits=logits,
            image_logits=image_logits,
            past_key_values=past_key_values if use_cache else None,
            image_hidden_states=image_features,
        )

    def loss_function_armor(
        self, logits: torch.Tensor, image_logits: torch.Tensor, labels: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha * CE(text head) + beta * CE(visual head), each averaged over the positions whose target it owns.

        A part whose weight is 0 is reported (detached) but left out of the sum, so no gradient reaches its head.
        """
        first_visual_id = self.config.imgend_token_id
        targets = labels[:, 1:].reshape(-1)
        text_scores = logits[:, :-1].reshape(-1, logits.shape[-1])
        image_scores = image_logits[:, :-1].reshape(-1, image_logits.shape[-1])
        is_text = (targets >= 0) & (targets < first_visual_id)
        is_image = targets >= first_visual_id

        def masked_cross_entropy(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            losses = F.cross_entropy(scores.float(), target.masked_fill(~mask, 0), reduction="none")
            return (losses * mask).sum() / mask.sum().clamp(min=1)

        text_loss = masked_cross_entropy(text_scores, targets, is_text)
        image_loss = masked_cross_entropy(image_scores, targets - first_visual_id, is_image)
        parts = []
        if self.config.text_loss_weight > 0:
            parts.append(self.config.text_loss_weight * text_loss)
        if self.config.image_loss_weight > 0:
            parts.append(self.config.image_loss_weight * image_loss)
        loss = sum(parts) if parts else text_loss.detach() * 0
        return loss, text_loss.detach(), image_loss.detach()

    # --------------------------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, save_directory: str | Path, **kwargs):
        """Save the model, with the VQGAN in its own `vqgan/` sub-folder (as the checkpoint layout has it)."""
        state_dict = kwargs.pop("state_dict", None) or self.state_dict()
        state_dict = {name: tensor for name, tensor in state_dict.items() if not name.startswith("vqgan.")}
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        if kwargs.get("is_main_process", True):
            self.vqgan.save_pretrained(Path(save_directory) / "vqgan", safe_serialization=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args, **kwargs):
        """Load the model, then its VQGAN from the checkpoint's `vqgan/` sub-folder (kept in float32) and its
        `generation_config.json`."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision")
            if key in kwargs
        }
        try:
            vqgan = ArmorVQGANModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="vqgan", dtype=torch.float32, **hub_kwargs
            )
        except OSError as error:
            raise OSError(
                f"{pretrained_model_name_or_path} has no usable VQGAN in its `vqgan/` folder ({error}). An ARMOR "
                "checkpoint carries Chameleon's VQGAN there; write one with convert_checkpoint.py --vqgan PATH."
            ) from error
        model.vqgan = vqgan.to(model.lm_head.weight.device).eval()
        # ARMOR's `generate` is its own (no `GenerationMixin`), so transformers does not load this file for us.
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:
            pass  # no generation_config.json: keep the defaults built from the config
        return model

    # ---------------------------------------------------------------------------------------------------- chat

    def chat(
        self,
        tokenizer,
        pixel_values: torch.FloatTensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None = None,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        system_message: str | None = None,
        verbose: bool = False,
    ):
        """InternVL2.5's `chat()`: one question (with optional image tiles and history) in, the answer out.

        The answer is an `ArmorAnswer`: a `str` holding the answer's text, so that tools written for InternVL
        (VLMEvalKit's wrapper) keep working, with `.segments`, the answer as text and PIL images in order.
        """
        answers, history = self._chat(
            tokenizer, pixel_values, [question], generation_config, history, num_patches_list, system_message
        )
        if verbose:
            print(f"User: {question}\nAssistant: {answers[0]}")
        return (answers[0], history) if return_history else answers[0]

    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.FloatTensor | None,
        questions: list[str],
        generation_config: dict | GenerationConfig | None = None,
        num_patches_list: list[int] | None = None,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        system_message: str | None = None,
    ) -> list:
        """InternVL2.5's `batch_chat()`: one question per row, `num_patches_list[i]` tiles of `pixel_values` each."""
        if history is not None or return_history:
            raise NotImplementedError("batch_chat does not take a history; call chat() per conversation.")
        answers, _ = self._chat(
            tokenizer, pixel_values, list(questions), generation_config, None, num_patches_list, system_message
        )
        return answers

    def _chat(self, tokenizer, pixel_values, questions, generation_config, history, num_patches_list, system_message):
        from .processing_armor import ArmorProcessor, build_internvl_prompt

        processor = ArmorProcessor(
            tokenizer=tokenizer,
            image_seq_length=self.config.image_seq_length,
            num_image_codes=self.config.num_image_codes,
            vqgan=self.vqgan,
        )
        if num_patches_list is None:
            num_patches_list = [] if pixel_values is None else [pixel_values.shape[0]] * (len(questions) == 1)
        if pixel_values is not None and len(questions) > 1 and len(num_patches_list) != len(questions):
            raise ValueError(f"batch_chat needs one num_patches_list entry per question ({len(questions)}).")
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches_list {num_patches_list} adds up to {sum(num_patches_list)} tiles but pixel_values "
                f"has {pixel_values.shape[0]}."
            )
        prompts = []
        for index, question in enumerate(questions):
            tiles = num_patches_list[index : index + 1] if len(questions) > 1 else num_patches_list
            if history is None and tiles and "<image>" not in question:
                question = "<image>\n" + question
            if question.count("<image>") != len(tiles):
                raise ValueError(
                    f"The question has {question.count('<image>')} <image> placeholders but {len(tiles)} images."
                )
            questions[index] = question
            prompt = build_internvl_prompt(question, history, system_message)
            prompts.append(processor._expand_image_placeholders(prompt, tiles))
        inputs = processor.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        settings = (
            generation_config.to_dict()
            if isinstance(generation_config, GenerationConfig)
            else dict(generation_config or {})
        )
        if settings.pop("num_beams", 1) not in (None, 1):
            raise ValueError(
                "ARMOR's generate samples or decodes greedily; beam search (num_beams > 1) is not supported."
            )
        settings.setdefault("eos_token_id", tokenizer.convert_tokens_to_ids("<|im_end|>"))
        device = self.lm_head.weight.device
        sequences = self.generate(
            inputs["input_ids"].to(device),
            pixel_values=None if pixel_values is None else pixel_values.to(device, self.dtype),
            attention_mask=inputs["attention_mask"].to(device),
            **settings,
        )
        answers = [
            ArmorAnswer.from_segments(processor.decode(row)) for row in sequences[:, inputs["input_ids"].shape[1] :]
        ]
        history = list(history or []) + [(questions[0], str(answers[0]))]
        return answers, history

    # ------------------------------------------------------------------------------------------------ generate

    def decode_step(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        past_key_values: Cache,
        need_text_logits: bool,
        need_adapter: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One token per row through LLM, adapter and the heads asked for; a pure function of its tensors and cache.

        `need_adapter=False` skips the adapter: no image logits, `<imgbos>` scores `-inf`, and the adapter's cache
        misses this position. That is only right when no image can follow.
        """
        inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        ).last_hidden_state
        adapter_states = image_logits = None
        if need_adapter:
            adapter_states = self.run_adapter(hidden_states, attention_mask, position_ids, past_key_values, True)
            adapter_states = adapter_states[:, -1]
            image_logits = self.visual_head(adapter_states)
        text_logits = self.text_head(hidden_states[:, -1], adapter_states) if need_text_logits else None
        return text_logits, image_logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        negative_prompt_ids: torch.LongTensor | None = None,
        negative_prompt_attention_mask: torch.LongTensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        progress_bar: bool = False,
        num_patches_list: list[int] | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        r"""
        Answer with text, images, or both, switching heads as the paper's forward switching does.

        In text mode a row samples from the text head (vocabulary + `<imgbos>`, whose score reads the adapter's
        output, so the adapter runs at every step unless no image can be drawn). `<imgbos>` puts it in image mode:
        it then samples exactly `config.num_image_codes` codes from the visual head (only codes are allowed), gets
        `<imgend>` appended and returns to text mode. Rows switch independently inside one batch. A prompt that ends
        with `<imgbos>` starts in image mode.

        An image is never cut short: `<imgbos>` is only allowed while at least `num_image_codes + 2` new tokens remain
        (`<imgbos>`, the codes, `<imgend>`); with less room the text head picks among the other tokens.

        Generation settings come from `generation_config` (default: the checkpoint's `generation_config.json`),
        overridden by keyword arguments of the same names:

        - `max_new_tokens`, `eos_token_id`, `pad_token_id`;
        - `modality`: `"auto"` (the model decides; default), `"text"` (`<imgbos>` is never chosen) or `"image"` (the
          answer is one image: `<imgbos>`, codes, `<imgend>`, then end of turn);
        - text tokens: `do_sample`, `temperature`, `top_k`, `top_p`;
        - image tokens: `image_do_sample`, `image_temperature`, `image_top_k`, `image_top_p`;
        - `guidance_scale`: classifier-free guidance of image tokens (1 or None: off). Conditional and
          unconditional rows run as one batch of twice the size; the unconditional rows see `negative_prompt_ids`
          (default: the prompt with every token but a final `<imgbos>` replaced by `<imgpad>`), then the same
          generated tokens;
        - `cache_implementation`: `"dynamic"` (default) or `"static"` (preallocated; on CUDA the decode step is
          compiled with `torch.compile`, which is what makes decoding fast).

        Args:
            input_ids: `(batch, length)` prompt ids, left-padded (see `ArmorProcessor`).
            pixel_values: `(tiles, 3, 448, 448)` input image tiles for the `<IMG_CONTEXT>` runs.
            attention_mask: `(batch, length)`, 0 on padding.
            negative_prompt_ids / negative_prompt_attention_mask: `(batch or 1, length)` negative prompt for guidance.
            generator: one `torch.Generator` for the batch, or one per row.
            seed: seeds one generator per row, so that each row gets what it would get alone with that seed.
            progress_bar: show a progress bar over the image tokens.
            num_patches_list: tiles per input image, as `ArmorProcessor` returns it; not needed, since the tiles'
                features go to the `<IMG_CONTEXT>` runs in order, but accepted so that `generate(**inputs)` works.

        Returns:
            `torch.LongTensor` of shape `(batch, length + new_tokens)`: the prompt, then the answer (rows that ended
            early are filled with `pad_token_id`). `ArmorProcessor.batch_decode` turns answers into text and images.
        """
        config = self.config
        settings = self._generation_settings(generation_config, kwargs)
        batch_size, prompt_length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        max_new_tokens = settings.max_new_tokens
        num_codes = config.num_image_codes
        use_guidance = settings.guidance_scale is not None and settings.guidance_scale != 1.0
        starts_in_image = input_ids[:, -1] == config.imgbos_token_id
        if starts_in_image.any() and max_new_tokens < num_codes + 1:
            raise ValueError(
                f"The prompt ends with <imgbos>, so the answer needs {num_codes + 1} tokens (codes + <imgend>) but "
                f"max_new_tokens is {max_new_tokens}; raise max_new_tokens."
            )
        if settings.modality == "image" and max_new_tokens < num_codes + 2:
            raise ValueError(
                f"modality='image' needs max_new_tokens >= {num_codes + 2} (<imgbos>, {num_codes} codes, <imgend>); "
                f"got {max_new_tokens}."
            )

        # Rows of the model batch: the prompts, then (with guidance) their unconditional twins.
        model_ids, model_mask = input_ids, attention_mask
        if use_guidance:
            uncond_ids, uncond_mask = self._unconditional_prompt(
                input_ids, attention_mask, negative_prompt_ids, negative_prompt_attention_mask
            )
            length = max(prompt_length, uncond_ids.shape[1])
            model_ids = torch.cat([_left_pad(input_ids, length, 0), _left_pad(uncond_ids, length, 0)])
            model_mask = torch.cat([_left_pad(attention_mask, length, 0), _left_pad(uncond_mask, length, 0)])
        model_length = model_ids.shape[1]
        full_mask = torch.cat([model_mask, model_mask.new_ones(model_mask.shape[0], max_new_tokens)], dim=1)
        position_ids = (model_mask.cumsum(-1) - 1).clamp(min=0)
        next_positions = position_ids[:, -1:] + 1

        # The adapter feeds the visual head and the `<imgbos>` score, so it runs at every step (keeping its cache
        # whole) unless no image can be drawn: `modality="text"` with no prompt that ends in `<imgbos>`.
        need_adapter = settings.modality != "text" or bool(starts_in_image.any())
        static = settings.cache_implementation == "static"
        if static:
            cache = StaticCache(config=config.get_adapter_text_config(), max_cache_len=full_mask.shape[1])
        else:
            cache = self.new_cache()
        step_fn = self._decode_step_function(static)

        outputs = self(
            input_ids=model_ids,
            pixel_values=pixel_values,
            attention_mask=full_mask if static else model_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        text_logits, image_logits = outputs.logits[:, -1], outputs.image_logits[:, -1]

        generators = _row_generators(generator, seed, batch_size, device)
        text_warpers = _warpers(settings.temperature, settings.top_k, settings.top_p)
        image_sampler = ImageCodeSampler(
            guidance=ClassifierFreeGuidanceLogitsProcessor(settings.guidance_scale) if use_guidance else None,
            warpers=_warpers(settings.image_temperature, settings.image_top_k, settings.image_top_p),
            do_sample=settings.image_do_sample,
            generators=generators,
            batch_size=batch_size,
        )
        eos_ids = torch.tensor(settings.eos_token_ids, device=device, dtype=torch.long)

        # Per-row state: codes emitted in the current image (-1 in text mode), images finished, answer ended.
        codes_done = torch.where(starts_in_image, 0, -1)
        images_done = torch.zeros(batch_size, dtype=torch.long, device=device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        answer = torch.full((batch_size, max_new_tokens), settings.pad_token_id, dtype=torch.long, device=device)
        progress = None

        step = 0
        while step < max_new_tokens:
            in_image = (codes_done >= 0) & ~finished
            wants_code = in_image & (codes_done < num_codes)

            # Fast path: every unfinished row is inside an image, so the next steps are codes for all of them.
            # They run without reading anything back from the device, so the host queues steps ahead of the GPU.
            if bool((wants_code | finished).all()):
                run_length = int((num_codes - codes_done[wants_code]).min())
                rows = wants_code.nonzero().squeeze(1)
                for _ in range(run_length):
                    codes = image_sampler(image_logits, rows)
                    tokens = torch.full((batch_size,), settings.pad_token_id, dtype=torch.long, device=device)
                    tokens[rows] = codes + config.image_code_offset
                    answer[:, step] = tokens
                    step += 1
                    progress = _update_progress(progress, progress_bar, num_codes)
                    text_logits, image_logits = step_fn(
                        (torch.cat([tokens, tokens]) if use_guidance else tokens).unsqueeze(1),
                        next_positions,
                        full_mask if static else full_mask[:, : model_length + step],
                        cache,
                        False,
                        True,
                    )
                    next_positions = next_positions + 1
                codes_done = torch.where(wants_code, codes_done + run_length, codes_done)
                continue

            remaining = max_new_tokens - step
            tokens = torch.full((batch_size,), settings.pad_token_id, dtype=torch.long, device=device)
            wants_end = in_image & (codes_done == num_codes)
            in_text = ~in_image & ~finished
            if wants_code.any():
                rows = wants_code.nonzero().squeeze(1)
                codes = image_sampler(image_logits, rows)
                tokens[rows] = codes + config.image_code_offset
                progress = _update_progress(progress, progress_bar, num_codes)
            tokens[wants_end] = config.imgend_token_id
            if in_text.any():
                rows = in_text.nonzero().squeeze(1)
                if settings.modality == "image":
                    tokens[rows] = torch.where(images_done[rows] == 0, config.imgbos_token_id, settings.pad_token_id)
                    if settings.eos_token_ids:
                        tokens[rows] = torch.where(images_done[rows] == 0, tokens[rows], settings.eos_token_ids[0])
                else:
                    scores = text_logits[rows].float()
                    if settings.modality == "text" or remaining < num_codes + 2:
                        scores[:, config.imgbos_token_id] = float("-inf")
                    scores = text_warpers(None, scores)
                    tokens[rows] = _sample(scores, settings.do_sample, generators, rows.tolist())

            answer[:, step] = tokens
            step += 1
            codes_done = torch.where(wants_code, codes_done + 1, codes_done)
            codes_done = torch.where(wants_end, -1, codes_done)
            codes_done = torch.where(in_text & (tokens == config.imgbos_token_id), 0, codes_done)
            images_done = images_done + wants_end.long()
            finished = finished | (in_text & torch.isin(tokens, eos_ids))
            if settings.modality == "image":
                finished = finished | (in_text & (images_done > 0))
            if finished.all() or step == max_new_tokens:
                break

            # Rows past their end keep being fed (pad); their output is ignored.
            need_text = bool(((codes_done < 0) & ~finished).any())
            text_logits, image_logits = step_fn(
                (torch.cat([tokens, tokens]) if use_guidance else tokens).unsqueeze(1),
                next_positions,
                full_mask if static else full_mask[:, : model_length + step],
                cache,
                need_text,
                need_adapter,
            )
            next_positions = next_positions + 1

        if progress is not None:
            progress.close()
        return torch.cat([input_ids, answer[:, :step]], dim=1)

    def _generation_settings(self, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        """The checkpoint's generation config, overridden by `generation_config` and keyword arguments, checked."""
        settings = copy.deepcopy(generation_config or self.generation_config)
        for name, default in ARMOR_GENERATION_DEFAULTS.items():
            if getattr(settings, name, None) is None:
                setattr(settings, name, default)
        unknown = settings.update(**kwargs)
        if unknown:
            raise TypeError(f"generate() got unknown arguments {sorted(unknown)}.")
        if settings.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {settings.modality!r}.")
        if settings.max_new_tokens is None or settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {settings.max_new_tokens}.")
        for name in ("temperature", "image_temperature"):
            if getattr(settings, name) is not None and getattr(settings, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(settings, name)}; use do_sample=False for greedy.")
        for name in ("top_p", "image_top_p"):
            value = getattr(settings, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}.")
        for name in ("top_k", "image_top_k"):
            value = getattr(settings, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if settings.guidance_scale is not None and settings.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be > 0 (1 switches guidance off), got {settings.guidance_scale}.")
        if settings.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation must be 'dynamic' or 'static', got {settings.cache_implementation!r}."
            )
        eos = settings.eos_token_id
        settings.eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if settings.pad_token_id is None:
            fallback = settings.eos_token_ids or [self.config.imgpad_token_id]
            settings.pad_token_id = fallback[0]
        return settings

    def _unconditional_prompt(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        negative_prompt_ids: torch.LongTensor | None,
        negative_prompt_attention_mask: torch.LongTensor | None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The context of the unconditional rows: the negative prompt, or the prompt blanked out with `<imgpad>`.

        A trailing `<imgbos>` stays, so that both rows of a prompt that starts in image mode are in image mode.
        """
        if negative_prompt_ids is None:
            blank = torch.full_like(input_ids, self.config.imgpad_token_id)
            blank[:, -1] = torch.where(input_ids[:, -1] == self.config.imgbos_token_id, input_ids[:, -1], blank[:, -1])
            return blank, attention_mask
        if negative_prompt_ids.shape[0] not in (1, input_ids.shape[0]):
            raise ValueError(
                f"negative_prompt_ids has {negative_prompt_ids.shape[0]} rows; give 1 or one per prompt "
                f"({input_ids.shape[0]})."
            )
        if negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones_like(negative_prompt_ids)
        rows = input_ids.shape[0]
        return negative_prompt_ids.expand(rows, -1), negative_prompt_attention_mask.expand(rows, -1)

    def _decode_step_function(self, static: bool):
        """`decode_step`, compiled once per model when the cache is static and the model is on CUDA."""
        if not (static and self.device.type == "cuda"):
            return self.decode_step
        if getattr(self, "_compiled_decode_step", None) is None:
            self._compiled_decode_step = torch.compile(self.decode_step, mode="reduce-overhead", fullgraph=True)
        return self._compiled_decode_step


class ArmorAnswer(str):
    """An answer from `chat()`: the `str` is its text; `.segments` holds text and PIL images in answer order."""

    segments: list

    @classmethod
    def from_segments(cls, segments: list) -> "ArmorAnswer":
        answer = cls("".join(segment for segment in segments if isinstance(segment, str)).strip())
        answer.segments = segments
        return answer

    @property
    def images(self) -> list:
        return [segment for segment in self.segments if not isinstance(segment, str)]


@dataclass
class ImageCodeSampler:
    """Draws codes from the visual head: codes only, guided by the unconditional twin rows, warped, then sampled."""

    guidance: ClassifierFreeGuidanceLogitsProcessor | None
    warpers: LogitsProcessorList
    do_sample: bool
    generators: torch.Generator | list[torch.Generator] | None
    batch_size: int

    def __call__(self, image_logits: torch.Tensor, rows: torch.LongTensor) -> torch.LongTensor:
        scores = image_logits[rows, 2:].float()
        if self.guidance is not None:
            unconditional = image_logits[rows + self.batch_size, 2:].float()
            scores = self.guidance(rows.unsqueeze(1), torch.cat([scores, unconditional]))
        scores = self.warpers(None, scores)
        # All rows: no read-back from the device, which keeps the fast path free of host synchronisation.
        row_ids = range(self.batch_size) if len(rows) == self.batch_size else rows.tolist()
        return _sample(scores, self.do_sample, self.generators, row_ids)


# Settings `generate` reads beyond transformers' own, with their defaults when a generation config lacks them.
ARMOR_GENERATION_DEFAULTS = {
    "modality": "auto",
    "do_sample": False,
    "image_do_sample": True,
    "image_temperature": 1.0,
    "image_top_k": 0,
    "image_top_p": 1.0,
}


def _left_pad(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (length - tensor.shape[1], 0), value=value)


def _warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """transformers' own warpers, in the order `generate` applies them."""
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _row_generators(
    generator: torch.Generator | list[torch.Generator] | None, seed: int | None, batch_size: int, device: torch.device
) -> torch.Generator | list[torch.Generator] | None:
    if seed is not None:
        if generator is not None:
            raise ValueError("Pass either `generator` or `seed`, not both.")
        return [torch.Generator(device=device).manual_seed(seed) for _ in range(batch_size)]
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} rows.")
    return generator


def _sample(
    scores: torch.Tensor,
    do_sample: bool,
    generators: torch.Generator | list[torch.Generator] | None,
    rows: list[int] | range,
) -> torch.LongTensor:
    """Greedy, or one draw per row from softmax(scores) (exponential race, as gpt-fast), per-row generators allowed."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    noise = torch.empty_like(probs)
    if isinstance(generators, list):
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=generators[row])
    else:
        noise.exponential_(generator=generators)
    return (probs / noise).argmax(dim=-1)


def _update_progress(progress, enabled: bool, num_codes: int):
    """A tqdm bar over the codes of the image being drawn (one tick per step that draws codes)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    if progress is None or progress.n >= num_codes:
        if progress is not None:
            progress.close()
        progress = tqdm(total=num_codes, desc="image tokens", unit="tok")
    progress.update(1)
    return progress


__all__ = ["ArmorPreTrainedModel", "ArmorForConditionalGeneration", "ArmorCausalLMOutputWithPast", "image_mode_mask"]
