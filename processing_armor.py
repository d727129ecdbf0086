"""ARMOR's processor: InternVL2.5 prompts and images in, token ids out; generated ids in, text and images out.

It bundles the three tokenizers of the pipeline:

* the text tokenizer: the LLM's own, plus `<imgbos>`, `<imgend>`, `<imgpad>` at ids V, V+1, V+2 (checkpoint folder
  `tokenizer/`);
* InternVL2.5's tiling image processor for input images: transformers' `GotOcr2ImageProcessorPil`, which picks the
  same tile grid and gives the same pixels as InternVL's `dynamic_preprocess` + `build_transform`
  (`preprocessor_config.json`);
* the VQGAN for output images (image <-> codes, folder `vqgan/`), loaded only when codes must be made or drawn.

Token ids: text `[0, V)`, `<imgbos>` V, `<imgend>` V+1, `<imgpad>` V+2, image code c at `V + 3 + c`.
"""

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil
from transformers.dynamic_module_utils import custom_object_save
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ProcessorMixin
from transformers.utils import CHAT_TEMPLATE_FILE, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

from .modeling_vqgan import ArmorVQGANModel

# InternVL's prompt conventions: the user writes `<image>`; the processor replaces it by `<img>`, 256 `<IMG_CONTEXT>`
# per tile (the features of the tile go there) and `</img>`.
IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# ARMOR's tokens: the text head's switch into image mode, the end of an image, padding inside image mode.
IMGBOS_TOKEN = "<imgbos>"
IMGEND_TOKEN = "<imgend>"
IMGPAD_TOKEN = "<imgpad>"

TOKENIZER_SUBFOLDER = "tokenizer"
VQGAN_SUBFOLDER = "vqgan"

# InternVL2.5's image preprocessing (`dynamic_preprocess` + `build_transform`): up to 12 tiles of 448 px whose grid
# has the aspect ratio closest to the image's, a 448 px thumbnail of the whole image when there is more than one tile,
# bicubic resizing, ImageNet normalisation.
INTERNVL_TILE_SIZE = 448
INTERNVL_MIN_TILES = 1
INTERNVL_MAX_TILES = 12
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# The `internvl2_5` conversation template of InternVL's `conversation.py` (what `InternVLChatModel.chat()` uses).
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SYSTEM_HEADER = "<|im_start|>system\n"
USER_HEADER = "<|im_start|>user\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>\n"

# The same template for `apply_chat_template`. Content may be a string or a list of {"type": "text", "text": ...} and
# {"type": "image"} entries; an image entry becomes "<image>\n" (InternVL's placement: the image, then a new line).
# The assistant header is added when `add_generation_prompt` is set or the conversation ends with a user turn, so that
# `apply_chat_template(messages)` equals `build_internvl_prompt`, which always ends with it.
INTERNVL2_5_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- else -%}{{- raise_exception('ARMOR chat template: content entries must be of type text or image, got ' "
    "+ item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '" + INTERNVL2_5_SYSTEM_MESSAGE + "' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<|im_start|>user\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- else -%}{{- raise_exception('ARMOR chat template: roles after the first message must be user or "
    "assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- set text = render(message['content']) -%}"
    "{%- if text -%}{{- text + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt or (loop_messages and loop_messages[-1]['role'] == 'user') -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def build_internvl_prompt(
    question: str,
    history: list[tuple[str, str]] | None = None,
    system_message: str | None = None,
    num_images: int = 0,
) -> str:
    """
    The prompt InternVL2.5's `chat()` gives the LLM (template `internvl2_5`), before `<image>` is expanded:
    `<|im_start|>system\\n{system}<|im_end|>\\n`, then per past turn `<|im_start|>user\\n{q}<|im_end|>\\n`
    `<|im_start|>assistant\\n{a}<|im_end|>\\n`, then `<|im_start|>user\\n{question}<|im_end|>\\n` and
    `<|im_start|>assistant\\n`.

    As in InternVL's template, an empty message is written as its role header alone. `system_message=None` uses
    InternVL2.5's default. With `num_images` > 0 and no `<image>` in `question`, `"<image>\\n"` is put in front of the
    question once per image; for one image that is what `chat()` does (for several, `chat()` would leave all but the
    first image without a placeholder).
    """
    if not isinstance(question, str):
        raise TypeError(f"`question` must be a string, got {type(question).__name__}.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"`num_images` must be a non-negative integer, got {num_images!r}.")
    if system_message is not None and not isinstance(system_message, str):
        raise TypeError(f"`system_message` must be a string or None, got {type(system_message).__name__}.")
    if num_images and IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question

    turns = []
    for index, turn in enumerate(history or []):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(part, str) for part in turn)):
            raise ValueError(f"`history[{index}]` must be a (question, answer) pair of strings, got {turn!r}.")
        turns += [(USER_HEADER, turn[0]), (ASSISTANT_HEADER, turn[1])]
    turns += [(USER_HEADER, question), (ASSISTANT_HEADER, "")]

    system = INTERNVL2_5_SYSTEM_MESSAGE if system_message is None else system_message
    prompt = SYSTEM_HEADER + system + END_OF_TURN
    for header, message in turns:
        prompt += header + (message + END_OF_TURN if message else "")
    return prompt


def internvl_image_processor(max_tiles: int = INTERNVL_MAX_TILES) -> GotOcr2ImageProcessorPil:
    """InternVL2.5's tiling preprocessing as a transformers image processor (PIL backend, as InternVL resizes)."""
    return GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=INTERNVL_MIN_TILES,
        max_patches=max_tiles,
        size={"height": INTERNVL_TILE_SIZE, "width": INTERNVL_TILE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image, a file path, the bytes of an image file, or a uint8 array [H, W(, C)]."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise ValueError(
                f"Image URLs are not fetched ({path}); download the image and pass its path or a PIL image."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file {path} does not exist; pass an existing image path or a PIL image.")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened
        except (OSError, Image.UnidentifiedImageError) as error:
            raise ValueError(
                f"{path} is not an image file PIL can read ({error}); pass a PNG, JPEG or other image."
            ) from error
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return opened
        except (OSError, Image.UnidentifiedImageError) as error:
            raise ValueError(
                f"The {len(image)} bytes given (starting {bytes(image[:8])!r}) are not an image file PIL can read "
                f"({error}); pass the bytes of a PNG, JPEG or other image file."
            ) from error
    if isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
        ):
            raise ValueError(
                f"An image array must be uint8 [height, width] or [height, width, 1|3|4], got {image.dtype} "
                f"{tuple(image.shape)}."
            )
        return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}; pass a PIL image, a file path, the bytes of an image file "
        "or a uint8 numpy array [height, width, 3]."
    )


class ArmorProcessor(ProcessorMixin):
    r"""
    Turns InternVL2.5 prompts with `<image>` placeholders and their images into model inputs, and generated ids into
    text and images.

    Args:
        image_processor (`GotOcr2ImageProcessorPil`, *optional*):
            Tiles input images as InternVL2.5 does; defaults to `internvl_image_processor()`.
        tokenizer (`PreTrainedTokenizerBase`):
            The LLM's tokenizer with `<imgbos>`, `<imgend>`, `<imgpad>` as its last three ids (`convert_tokenizer.py`).
        chat_template (`str`, *optional*):
            Jinja template for `apply_chat_template`; defaults to InternVL2.5's `internvl2_5`.
        image_seq_length (`int`, *optional*, defaults to 256):
            `<IMG_CONTEXT>` tokens per 448 px tile (the vision tower's features per tile after pixel shuffle).
        num_image_codes (`int`, *optional*, defaults to 1024):
            VQGAN codes per generated image, a square grid (`config.num_image_codes`).
        vqgan (`ArmorVQGANModel`, *optional*):
            The VQGAN. Without it, it is loaded from the checkpoint's `vqgan/` folder the first time it is needed.
    """

    def __init__(
        self,
        image_processor: GotOcr2ImageProcessorPil | None = None,
        tokenizer=None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        num_image_codes: int = 1024,
        vqgan: ArmorVQGANModel | None = None,
    ):
        if tokenizer is None:
            raise ValueError(
                "ArmorProcessor needs the tokenizer: `ArmorProcessor(tokenizer=...)` with <imgbos>, <imgend>, "
                "<imgpad> added (convert_tokenizer.py), or `ArmorProcessor.from_pretrained(checkpoint)`."
            )
        if image_processor is None:
            image_processor = internvl_image_processor()
        if not isinstance(image_processor, GotOcr2ImageProcessorPil):
            raise TypeError(
                f"`image_processor` must be a GotOcr2ImageProcessorPil (InternVL2.5's tiling with PIL resizing), "
                f"got {type(image_processor).__name__}; other backends resize differently. Use "
                "`internvl_image_processor()`."
            )
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"`image_seq_length` must be a positive integer, got {image_seq_length!r}.")
        side = math.isqrt(num_image_codes) if isinstance(num_image_codes, int) and num_image_codes > 0 else 0
        if isinstance(num_image_codes, bool) or side < 1 or side * side != num_image_codes:
            raise ValueError(
                f"`num_image_codes` must be a square number of VQGAN codes (1024 = 32x32, 256 = 16x16), got "
                f"{num_image_codes!r}."
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or INTERNVL2_5_CHAT_TEMPLATE)
        self.image_seq_length = image_seq_length
        self.num_image_codes = num_image_codes

        # The same names as ArmorConfig's fields, so an id can be followed from here to the model.
        self.image_token_id = self._token_id(IMG_CONTEXT_TOKEN)
        self.image_start_token_id = self._token_id(IMG_START_TOKEN)
        self.image_end_token_id = self._token_id(IMG_END_TOKEN)
        self.imgbos_token_id = self._token_id(IMGBOS_TOKEN)
        self.imgend_token_id = self._token_id(IMGEND_TOKEN)
        self.imgpad_token_id = self._token_id(IMGPAD_TOKEN)
        vocab_size = self.imgbos_token_id
        expected = (vocab_size + 1, vocab_size + 2, vocab_size + 3)
        if (self.imgend_token_id, self.imgpad_token_id, len(tokenizer)) != expected:
            raise ValueError(
                f"The tokenizer must end with <imgbos>, <imgend>, <imgpad> at ids V, V+1, V+2 (image codes follow at "
                f"V+3), but they are at {self.imgbos_token_id}, {self.imgend_token_id}, {self.imgpad_token_id} and "
                f"len(tokenizer) is {len(tokenizer)}. Rebuild it from the LLM's tokenizer with convert_tokenizer.py."
            )
        self.image_code_offset = vocab_size + 3

        self._vqgan = None
        self._vqgan_source = None
        if vqgan is not None:
            self.vqgan = vqgan

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no {token} token. ARMOR needs InternVL2.5's tokenizer (with <img>, </img>, "
                "<IMG_CONTEXT>) extended by convert_tokenizer.py (with <imgbos>, <imgend>, <imgpad>)."
            )
        return token_id

    # ------------------------------------------------------------------------------------------------------------
    # The VQGAN: shared with the model, or loaded on first use
    # ------------------------------------------------------------------------------------------------------------

    @property
    def vqgan(self) -> ArmorVQGANModel:
        """The VQGAN; loaded from the checkpoint's `vqgan/` folder on first use, so text-only use never loads it."""
        if self._vqgan is None:
            self._vqgan = self._load_vqgan()
        return self._vqgan

    @vqgan.setter
    def vqgan(self, model: ArmorVQGANModel | None):
        # Duck-typed: the model's VQGAN may come from another copy of modeling_vqgan.py (remote code).
        if model is not None and not all(hasattr(model, name) for name in ("encode", "decode", "config")):
            raise TypeError(f"`vqgan` must be an ArmorVQGANModel (e.g. `model.vqgan`), got {type(model).__name__}.")
        self._vqgan = model

    def _load_vqgan(self) -> ArmorVQGANModel:
        if self._vqgan_source is None:
            raise ValueError(
                "This processor has no VQGAN, which turns images into codes and back. Set `processor.vqgan = "
                "model.vqgan`, or load the processor with `ArmorProcessor.from_pretrained(checkpoint)`: the VQGAN in "
                "the checkpoint's vqgan/ folder is then loaded on first use."
            )
        source = dict(self._vqgan_source)
        path = source.pop("pretrained_model_name_or_path")
        try:
            model = ArmorVQGANModel.from_pretrained(path, **source)
        except OSError as error:
            raise OSError(
                f"Could not load the VQGAN from {path} (sub-folder {source['subfolder']!r}): {error}. An ARMOR "
                "checkpoint keeps it in vqgan/ (config.json + model.safetensors); or set `processor.vqgan`."
            ) from error
        return model.eval()

    @property
    def generated_image_size(self) -> int:
        """Side in pixels of a generated image: codes per side x the VQGAN's downsampling."""
        return math.isqrt(self.num_image_codes) * self.vqgan.config.downsample_factor

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        negative_prompt: str | list[str] | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenize prompts (already in the chat template, see `build_internvl_prompt`), expanding each `<image>` to
        `<img>` + `<IMG_CONTEXT>` x `image_seq_length` x tiles + `</img>`, as InternVL's `chat()` does.

        Args:
            text: one prompt or a batch of prompts.
            images: the images of the `<image>` placeholders, in order: one image, a flat list for all prompts, or one
                list per prompt. An image is a PIL image, a file path, the bytes of an image file or a uint8 array.
            return_tensors: `"pt"`, `"np"` or None (lists).
            padding: True / `"longest"` (pad to the longest row), `"max_length"` (to `max_length`) or False. Padding
                is on the left, where generation needs it.
            negative_prompt: text of the unconditional prompt for classifier-free guidance, put into the same
                template (`""` for an empty question); one string for all rows or one per row.
            add_special_tokens: passed to the tokenizer (InternLM2's adds `<s>`, Qwen2's adds nothing).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`; with images `pixel_values` [tiles, 3, 448, 448] (the
            tiles of all images, in order) and `num_patches_list` (tiles per image, a list); with a negative prompt
            `negative_prompt_ids` and `negative_prompt_attention_mask`, padded to the same length as `input_ids`.
        """
        if kwargs:
            raise TypeError(f"ArmorProcessor got unexpected arguments {sorted(kwargs)}.")
        if videos is not None or audio is not None:
            raise ValueError("ArmorProcessor takes text and images only; videos and audio are not supported.")
        if text is None:
            raise ValueError(
                "`text` is required: a prompt with one <image> per image (see `build_internvl_prompt`). To turn an "
                "image into training targets use `encode_image_target`."
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(prompt, str) for prompt in texts):
            raise TypeError("`text` must be a string or a non-empty list of strings.")
        for index, prompt in enumerate(texts):
            if IMG_CONTEXT_TOKEN in prompt or IMG_START_TOKEN in prompt:
                raise ValueError(
                    f"Prompt {index} already contains {IMG_START_TOKEN} or {IMG_CONTEXT_TOKEN}; write "
                    f"{IMAGE_PLACEHOLDER} where an image goes and pass the image in `images`: the processor inserts "
                    "the image tokens."
                )
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}.")

        images_per_prompt = self._images_per_prompt(texts, images)
        flat_images = [load_image(image).convert("RGB") for row in images_per_prompt for image in row]
        data = {}
        if flat_images:
            processed = self.image_processor(flat_images, return_tensors="pt" if return_tensors == "pt" else "np")
            num_patches_list = [int(count) for count in processed["num_patches"]]
            data["pixel_values"] = processed["pixel_values"]
            data["num_patches_list"] = num_patches_list
            tiles = iter(num_patches_list)
            texts = [
                self._expand_image_placeholders(prompt, [next(tiles) for _ in row])
                for prompt, row in zip(texts, images_per_prompt)
            ]

        input_ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        negative_ids = None
        if negative_prompt is not None:
            negative_ids = self._tokenize_negative_prompt(negative_prompt, len(texts), add_special_tokens)

        length = self._padded_length(input_ids + (negative_ids or []), padding, max_length, return_tensors)
        data["input_ids"], data["attention_mask"] = self._left_pad(input_ids, length)
        if negative_ids is not None:
            data["negative_prompt_ids"], data["negative_prompt_attention_mask"] = self._left_pad(negative_ids, length)
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["num_patches_list"])

    def _images_per_prompt(self, texts: list[str], images) -> list[list]:
        """Assign the images to the prompts in placeholder order, checking the counts."""
        counts = [prompt.count(IMAGE_PLACEHOLDER) for prompt in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(row, (list, tuple)) for row in images)
        if nested:
            if len(images) != len(texts):
                raise ValueError(
                    f"`images` has {len(images)} lists but there are {len(texts)} prompts; give one list per prompt."
                )
            for index, (count, row) in enumerate(zip(counts, images)):
                if count != len(row):
                    raise ValueError(
                        f"Prompt {index} has {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(row)} image(s) were "
                        f"given for it; write one {IMAGE_PLACEHOLDER} per image (build_internvl_prompt(question, "
                        "num_images=...) adds them)."
                    )
            return [list(row) for row in images]
        if sum(counts) != len(images):
            raise ValueError(
                f"The text has {sum(counts)} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were "
                f"given; write one {IMAGE_PLACEHOLDER} per image (build_internvl_prompt(question, num_images=...) "
                "adds them)."
            )
        rows, start = [], 0
        for count in counts:
            rows.append(list(images[start : start + count]))
            start += count
        return rows

    def _expand_image_placeholders(self, prompt: str, tiles_per_image: list[int]) -> str:
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        expanded = pieces[0]
        for tiles, piece in zip(tiles_per_image, pieces[1:]):
            expanded += IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.image_seq_length * tiles) + IMG_END_TOKEN + piece
        return expanded

    def _tokenize_negative_prompt(
        self, negative_prompt: str | list[str], batch_size: int, add_special_tokens: bool
    ) -> list[list[int]]:
        negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch_size or not all(isinstance(negative, str) for negative in negatives):
            raise ValueError(
                f"`negative_prompt` must be one string or a list of {batch_size} strings (one per prompt), got "
                f"{negative_prompt!r}."
            )
        if any(IMAGE_PLACEHOLDER in negative for negative in negatives):
            raise ValueError(
                f"`negative_prompt` cannot hold {IMAGE_PLACEHOLDER}: the unconditional prompt has no images."
            )
        templated = [build_internvl_prompt(negative) for negative in negatives]
        return self.tokenizer(templated, add_special_tokens=add_special_tokens)["input_ids"]

    @staticmethod
    def _padded_length(
        sequences: list[list[int]], padding: bool | str, max_length: int | None, return_tensors: str | None
    ) -> int | None:
        longest = max(len(sequence) for sequence in sequences)
        if padding in (True, "longest"):
            return longest
        if padding == "max_length":
            if max_length is None or longest > max_length:
                raise ValueError(
                    f"padding='max_length' needs `max_length` >= the longest row ({longest} tokens), got "
                    f"{max_length}; rows are never truncated, since that would cut image tokens."
                )
            return max_length
        if padding in (False, "do_not_pad"):
            if return_tensors is not None and len({len(sequence) for sequence in sequences}) > 1:
                raise ValueError("Rows have different lengths; use padding=True or return_tensors=None.")
            return None
        raise ValueError(f"`padding` must be True, 'longest', 'max_length' or False, got {padding!r}.")

    def _left_pad(self, sequences: list[list[int]], length: int | None) -> tuple[list[list[int]], list[list[int]]]:
        if length is None:
            return [list(sequence) for sequence in sequences], [[1] * len(sequence) for sequence in sequences]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None and any(len(sequence) < length for sequence in sequences):
            raise ValueError("The tokenizer has no pad token; set `processor.tokenizer.pad_token` to pad a batch.")
        ids = [[pad_id] * (length - len(sequence)) + list(sequence) for sequence in sequences]
        mask = [[0] * (length - len(sequence)) + [1] * len(sequence) for sequence in sequences]
        return ids, mask

    def encode_image_target(self, image) -> list[int]:
        """
        The ids of an image as an answer (a training target): `<imgbos>`, the VQGAN codes of the image at the generated
        size, row by row, as ids `V + 3 + code`, then `<imgend>`. The VQGAN preprocesses as Chameleon does.
        """
        codes = self.vqgan.encode(load_image(image), image_size=self.generated_image_size)
        if codes.numel() != self.num_image_codes:
            raise ValueError(
                f"The VQGAN gave {codes.numel()} codes for a {self.generated_image_size}px image but "
                f"`num_image_codes` is {self.num_image_codes}; the processor and the model must agree on the "
                "generated image size."
            )
        codes = codes.flatten().cpu() + self.image_code_offset
        return [self.imgbos_token_id] + codes.tolist() + [self.imgend_token_id]

    # ------------------------------------------------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> list:
        """
        Generated ids -> a list of segments: `str` for each run of text tokens, `PIL.Image.Image` for each
        `<imgbos>` + `num_image_codes` codes + `<imgend>` span (drawn by the VQGAN). Empty text runs are left out;
        padding and end-of-turn tokens go with `skip_special_tokens`. Malformed image spans raise a ValueError that
        names the position.
        """
        ids = self._as_id_list(token_ids)
        segments = self._split_segments(ids)
        spans = [segment for segment in segments if segment[0] == "image"]
        images = iter(self._draw_codes([codes for _, codes, _ in spans], [start for _, _, start in spans]))
        output = []
        for kind, content, _ in segments:
            if kind == "image":
                output.append(next(images))
                continue
            piece = self.tokenizer.decode(content, skip_special_tokens=skip_special_tokens, **kwargs)
            if piece:
                output.append(piece)
        return output

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[list]:
        """`decode` for each row of a batch (a 2-D tensor or array, or a list of id lists)."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            if sequences.ndim != 2:
                raise ValueError(f"`batch_decode` takes a batch [rows, length], got shape {tuple(sequences.shape)}.")
            sequences = sequences.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]

    @staticmethod
    def _as_id_list(token_ids) -> list[int]:
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            if token_ids.ndim == 2 and token_ids.shape[0] == 1:
                token_ids = token_ids[0]
            if token_ids.ndim != 1:
                raise ValueError(
                    f"`decode` takes one sequence of ids, got shape {tuple(token_ids.shape)}; use `batch_decode`."
                )
            return [int(token) for token in token_ids.tolist()]
        if isinstance(token_ids, int):
            return [token_ids]
        ids = list(token_ids)
        if ids and isinstance(ids[0], (list, tuple)):
            raise ValueError("`decode` takes one sequence of ids, got a batch; use `batch_decode`.")
        return [int(token) for token in ids]

    def _split_segments(self, ids: list[int]) -> list[tuple[str, list[int], int]]:
        """(kind, ids or codes, start position) runs: text runs and checked image spans (codes without the offset)."""
        offset, num_codes = self.image_code_offset, self.num_image_codes
        segments, text_run, position = [], [], 0
        while position < len(ids):
            token = ids[position]
            if token < 0:
                raise ValueError(f"Position {position}: negative token id {token}.")
            if token >= offset:
                raise ValueError(
                    f"Position {position}: image code id {token} outside an <imgbos> ... <imgend> span; codes are "
                    "only valid right after <imgbos>."
                )
            if token != self.imgbos_token_id:
                text_run.append(token)
                position += 1
                continue
            if text_run:
                segments.append(("text", text_run, position - len(text_run)))
                text_run = []
            start, codes = position, []
            for code_position in range(start + 1, start + 1 + num_codes):
                if code_position >= len(ids):
                    raise ValueError(
                        f"The image span starting at position {start} ends after {len(codes)} of {num_codes} codes "
                        "(the sequence stops); was generation cut short by max_new_tokens?"
                    )
                code = ids[code_position]
                if code < offset:
                    raise ValueError(
                        f"Position {code_position}: id {code} inside the image span starting at position {start} is "
                        f"not an image code (ids >= {offset}); the span has {len(codes)} codes but needs {num_codes}."
                    )
                codes.append(code - offset)
            end = start + 1 + num_codes
            if end >= len(ids) or ids[end] != self.imgend_token_id:
                found = "the end of the sequence" if end >= len(ids) else f"id {ids[end]}"
                raise ValueError(
                    f"The image span starting at position {start} must close with <imgend> "
                    f"({self.imgend_token_id}) at position {end} after {num_codes} codes, found {found}."
                )
            segments.append(("image", codes, start))
            position = end + 1
        if text_run:
            segments.append(("text", text_run, len(ids) - len(text_run)))
        return segments

    def _draw_codes(self, spans: list[list[int]], starts: list[int]) -> list[Image.Image]:
        if not spans:
            return []
        codebook_size = self.vqgan.config.num_embeddings
        for codes, start in zip(spans, starts):
            for index, code in enumerate(codes):
                if code >= codebook_size:
                    raise ValueError(
                        f"Position {start + 1 + index}: id {code + self.image_code_offset} is past the last image "
                        f"code (id {self.image_code_offset + codebook_size - 1}, codebook of {codebook_size})."
                    )
        side = math.isqrt(self.num_image_codes)
        codes = torch.tensor(spans, dtype=torch.long).view(len(spans), side, side)
        with torch.no_grad():
            return self.vqgan.decode(codes, output_type="pil")

    # ------------------------------------------------------------------------------------------------------------
    # Saving and loading: tokenizer in tokenizer/, image processor and processor config at the root
    # ------------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """What `processor_config.json` holds; the components have their own files."""
        output = {
            "image_seq_length": self.image_seq_length,
            "num_image_codes": self.num_image_codes,
            "processor_class": type(self).__name__,
        }
        if getattr(self, "auto_map", None):
            output["auto_map"] = dict(self.auto_map)
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """
        Write `processor_config.json`, `preprocessor_config.json` and `chat_template.jinja` at the root of
        `save_directory` and the tokenizer in `tokenizer/`. With `ArmorProcessor.register_for_auto_class()` (done at
        import) also the code files (this file and the files it imports) and `auto_map`, so that
        `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works.
        """
        if push_to_hub:
            raise ValueError(
                "Use `processor.push_to_hub(repo_id)` to upload; `save_pretrained` writes a local folder."
            )
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        files = []
        if self._auto_class is not None:
            files += [str(path) for path in custom_object_save(self, save_directory, config=self)]
        files += [str(path) for path in self.image_processor.save_pretrained(save_directory)]
        files += [str(path) for path in self.tokenizer.save_pretrained(save_directory / TOKENIZER_SUBFOLDER)]
        if self.chat_template is not None:
            (save_directory / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
            files.append(str(save_directory / CHAT_TEMPLATE_FILE))
        self.to_json_file(save_directory / PROCESSOR_NAME)
        files.append(str(save_directory / PROCESSOR_NAME))
        return files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str = "main",
        **kwargs,
    ) -> "ArmorProcessor":
        """
        Load from an ARMOR checkpoint (folder or Hub repo): the tokenizer from `tokenizer/`, the image processor from
        `preprocessor_config.json`, the rest from `processor_config.json` and `chat_template.jinja`. The VQGAN in
        `vqgan/` is loaded the first time it is needed. Other keyword arguments override `processor_config.json`.
        """
        for name in ("trust_remote_code", "_from_auto", "_from_pipeline", "code_revision"):
            kwargs.pop(name, None)
        subfolder = kwargs.pop("subfolder", "") or ""
        path = str(pretrained_model_name_or_path)
        hub_kwargs = {
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "token": token,
            "revision": revision,
        }
        processor_dict, overrides = cls.get_processor_dict(path, subfolder=subfolder, **hub_kwargs, **kwargs)

        image_processor_dict, _ = GotOcr2ImageProcessorPil.get_image_processor_dict(
            path, subfolder=subfolder, **hub_kwargs
        )
        if not image_processor_dict:
            raise OSError(
                f"{path} has no {IMAGE_PROCESSOR_NAME}; an ARMOR checkpoint keeps the image processor there."
            )
        if not str(image_processor_dict.get("image_processor_type", "")).startswith("GotOcr2ImageProcessor"):
            raise ValueError(
                f"{IMAGE_PROCESSOR_NAME} in {path} describes {image_processor_dict.get('image_processor_type')}, not "
                "InternVL2.5's tiling (GotOcr2ImageProcessor)."
            )
        image_processor = GotOcr2ImageProcessorPil.from_dict(image_processor_dict)

        tokenizer_folder = f"{subfolder}/{TOKENIZER_SUBFOLDER}" if subfolder else TOKENIZER_SUBFOLDER
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder=tokenizer_folder, **hub_kwargs)
        except (OSError, ValueError) as error:
            raise OSError(
                f"Could not load the tokenizer from {path} (sub-folder {tokenizer_folder!r}): {error}. An ARMOR "
                "checkpoint keeps its tokenizer in tokenizer/ (convert_checkpoint.py writes it)."
            ) from error

        processor = cls.from_args_and_dict([image_processor, tokenizer], processor_dict, **overrides)
        vqgan_folder = f"{subfolder}/{VQGAN_SUBFOLDER}" if subfolder else VQGAN_SUBFOLDER
        processor._vqgan_source = {"pretrained_model_name_or_path": path, "subfolder": vqgan_folder, **hub_kwargs}
        return processor


ArmorProcessor.register_for_auto_class()

__all__ = ["ArmorProcessor", "build_internvl_prompt", "internvl_image_processor", "load_image"]
