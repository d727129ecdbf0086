"""ArmorProcessor: InternVL2.5 parity (tile grids, pixels, prompts, ids), ARMOR's image spans, saving and loading.

The InternVL reference below is written from InternVL2.5's documented preprocessing (`internvl_chat/internvl/train/
dataset.py`: `dynamic_preprocess`, `find_closest_aspect_ratio`, `build_transform`) without torchvision: PIL resize to
the tile grid, crop the tiles row by row, a thumbnail of the whole image last, ToTensor, Normalize. Reference prompts
and ids come from the fixtures' `tokenizer_expected.json` (made with InternVL's own tokenizers and templates).
"""

import filecmp
import functools
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from armor.convert_tokenizer import convert_tokenizer
from armor.modeling_vqgan import ArmorVQGANModel
from armor.processing_armor import (
    INTERNVL2_5_SYSTEM_MESSAGE,
    ArmorProcessor,
    build_internvl_prompt,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QWEN2 = FIXTURES / "internvl2_5-tiny-qwen2"
INTERNLM2 = FIXTURES / "internvl2_5-tiny-internlm2"
VQGAN = FIXTURES / "chameleon-vqgan-tiny"
REPO_ROOT = Path(__file__).resolve().parents[1]
QWEN2_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
CODE_FILES = ("configuration_armor.py", "modeling_vqgan.py", "processing_armor.py")

TILE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CODES = 16  # a 4x4 grid: 64 px with the tiny VQGAN (16x downsampling, 64 codes)
QWEN2_V = 1012  # len(InternVL2.5 tiny Qwen2 tokenizer): <imgbos> 1012, <imgend> 1013, <imgpad> 1014, codes from 1015
IMGBOS, IMGEND, IMGPAD, OFFSET = QWEN2_V, QWEN2_V + 1, QWEN2_V + 2, QWEN2_V + 3
IMG_START, IMG_END, IMG_CONTEXT, PAD, IM_END = 1003, 1004, 1005, 1000, 1002


# ---------------------------------------------------------------------------------------------------------------------
# InternVL2.5 reference (independent re-statement of its documented algorithm)
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def internvl_candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) grids with min_tiles <= columns * rows <= max_tiles, ordered by tile count (a stable sort of
    InternVL's set, as `dynamic_preprocess` builds it)."""
    grids = set()
    for count in range(min_tiles, max_tiles + 1):
        for columns in range(1, count + 1):
            for rows in range(1, count + 1):
                if min_tiles <= columns * rows <= max_tiles:
                    grids.add((columns, rows))
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def internvl_grid(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """`find_closest_aspect_ratio`: the grid whose columns/rows is closest to width/height; on a tie the later
    (larger) grid wins when the image area exceeds half the grid's pixel area."""
    image_ratio = width / height
    best, best_difference = (1, 1), float("inf")
    for columns, rows in internvl_candidate_grids(min_tiles, max_tiles):
        difference = abs(image_ratio - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and width * height > 0.5 * TILE * TILE * columns * rows:
            best = (columns, rows)
    return best


def internvl_tied_grids(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12) -> list[tuple[int, int]]:
    """All grids at the smallest aspect-ratio difference (more than one: a tie)."""
    grids = internvl_candidate_grids(min_tiles, max_tiles)
    differences = [abs(width / height - columns / rows) for columns, rows in grids]
    return [grid for grid, difference in zip(grids, differences) if difference == min(differences)]


def internvl_pixel_values(image: Image.Image, max_tiles: int = 12) -> torch.Tensor:
    """InternVL's `load_image`: RGB, `dynamic_preprocess` (thumbnail on), then `build_transform` on every tile."""
    image = image.convert("RGB")
    columns, rows = internvl_grid(image.width, image.height, 1, max_tiles)
    resized = image.resize((TILE * columns, TILE * rows))  # Pillow's default filter for RGB is bicubic
    tiles = [
        resized.crop((column * TILE, row * TILE, (column + 1) * TILE, (row + 1) * TILE))
        for row in range(rows)
        for column in range(columns)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((TILE, TILE)))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    # T.Resize((448, 448)) is a no-op on a 448x448 tile; ToTensor: uint8 HWC -> float CHW / 255; Normalize.
    tensors = [torch.from_numpy(np.array(tile)).permute(2, 0, 1).float().div(255) for tile in tiles]
    return torch.stack([(tensor - mean) / std for tensor in tensors])


def internvl_prompt(question: str, history=(), system: str = INTERNVL2_5_SYSTEM_MESSAGE) -> str:
    """conversation.py's `internvl2_5` template (MPT style: role + message + sep, a bare role for an empty message)."""
    messages = [(role, message) for turn in history for role, message in zip(("user", "assistant"), turn)]
    messages += [("user", question), ("assistant", None)]
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n"
    for role, message in messages:
        prompt += f"<|im_start|>{role}\n" + (f"{message}<|im_end|>\n" if message else "")
    return prompt


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode if mode != "RGBA" else None)


def expected_cases(folder: Path) -> dict:
    cases = json.loads((folder / "tokenizer_expected.json").read_text())["cases"]
    return {case["name"]: case for case in cases}


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


def make_qwen2_tokenizer(folder: Path):
    for name in QWEN2_TOKENIZER_FILES:
        shutil.copy(QWEN2 / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<imgbos>", "<imgend>", "<imgpad>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory):
    return make_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2-tokenizer"))


@pytest.fixture(scope="module")
def processor(qwen2_tokenizer) -> ArmorProcessor:
    return ArmorProcessor(tokenizer=qwen2_tokenizer, num_image_codes=NUM_CODES)


@pytest.fixture(scope="module")
def vqgan() -> ArmorVQGANModel:
    return ArmorVQGANModel.from_chameleon(VQGAN / "vqgan.yaml", VQGAN / "vqgan.ckpt")


@pytest.fixture
def drawing_processor(qwen2_tokenizer, vqgan) -> ArmorProcessor:
    return ArmorProcessor(tokenizer=qwen2_tokenizer, num_image_codes=NUM_CODES, vqgan=vqgan)


# ---------------------------------------------------------------------------------------------------------------------
# Tiling: the same grid as InternVL2.5
# ---------------------------------------------------------------------------------------------------------------------


def tie_sizes() -> list[tuple[int, int]]:
    """Image sizes whose aspect ratio equals several grids' (1:1 = 2:2 = 3:3, 2:1 = 4:2 = 6:3, ...)."""
    sizes = []
    for side in range(1, 1400, 3):
        for columns, rows in ((1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (3, 2), (2, 3), (4, 1), (2, 4), (4, 3)):
            sizes.append((side * columns, side * rows))
    return sizes


def sweep_sizes() -> list[tuple[int, int]]:
    return [(width, height) for width in range(1, 2700, 13) for height in range(1, 2700, 17)] + tie_sizes()


def test_tile_grid_matches_internvl_on_a_sweep_including_ties(processor):
    image_processor = processor.image_processor
    assert (image_processor.min_patches, image_processor.max_patches) == (1, 12)
    assert (image_processor.size.height, image_processor.size.width) == (TILE, TILE)
    mismatches, ties, larger_grid_won, smaller_grid_kept = [], 0, 0, 0
    for width, height in sweep_sizes():
        expected = internvl_grid(width, height)
        ours = get_optimal_tiled_canvas((height, width), (TILE, TILE), 1, 12)
        tiles = image_processor.get_number_of_image_patches(height, width)
        if ours != expected or tiles != expected[0] * expected[1] + (expected != (1, 1)):
            mismatches.append((width, height, expected, ours, tiles))
        tied = internvl_tied_grids(width, height)
        if len(tied) > 1:
            ties += 1
            larger_grid_won += expected != tied[0]
            smaller_grid_kept += expected == tied[0]
    assert mismatches == []
    assert ties > 3000 and larger_grid_won > 1000 and smaller_grid_kept > 1000


@pytest.mark.parametrize(
    "size, grid",
    [
        ((448, 448), (1, 1)),  # 1:1, 2:2, 3:3 tie; 448^2 is not more than half of 2x2 tiles
        ((633, 633), (1, 1)),  # 633^2 = 400689 <= 0.5 * 448^2 * 4 = 401408
        ((634, 634), (2, 2)),  # 401956 > 401408: the larger grid wins
        ((950, 950), (2, 2)),  # 902500 <= 0.5 * 448^2 * 9 = 903168
        ((951, 951), (3, 3)),  # 904401 > 903168
        ((896, 448), (2, 1)),  # 2:1 = 4:2 = 6:3 tie; 401408 <= 0.5 * 448^2 * 8 = 802816
        ((1800, 900), (4, 2)),  # 1620000 > 0.5 * 448^2 * 8 = 802816
        ((5000, 10), (12, 1)),
        ((10, 5000), (1, 12)),
    ],
)
def test_tile_grid_ties_break_like_internvl(processor, size, grid):
    width, height = size
    assert internvl_grid(width, height) == grid
    assert get_optimal_tiled_canvas((height, width), (TILE, TILE), 1, 12) == grid
    assert processor(text="<image>", images=random_image(width, height))["num_patches_list"] == [
        grid[0] * grid[1] + (grid != (1, 1))
    ]


@pytest.mark.parametrize("min_tiles, max_tiles", [(1, 6), (2, 12), (3, 12), (1, 40)])
def test_tile_grid_matches_internvl_for_other_tile_limits(min_tiles, max_tiles):
    for width, height in [(w, h) for w in range(1, 2400, 29) for h in range(1, 2400, 31)] + tie_sizes()[::7]:
        assert get_optimal_tiled_canvas((height, width), (TILE, TILE), min_tiles, max_tiles) == internvl_grid(
            width, height, min_tiles, max_tiles
        ), (width, height)


# ---------------------------------------------------------------------------------------------------------------------
# Pixels: the same values as InternVL2.5
# ---------------------------------------------------------------------------------------------------------------------

PIXEL_SIZES = [
    (448, 448),
    (634, 634),
    (951, 951),
    (500, 300),
    (300, 500),
    (1000, 200),
    (37, 1500),
    (1344, 448),
    (2001, 999),
    (1, 1),
    (50, 73),
    (3000, 2000),
]


@pytest.mark.parametrize("width, height", PIXEL_SIZES)
def test_pixel_values_match_internvl(processor, width, height):
    image = random_image(width, height, seed=width * 7 + height)
    expected = internvl_pixel_values(image)
    inputs = processor(text="<image>", images=image)
    assert inputs["pixel_values"].dtype == torch.float32
    assert inputs["pixel_values"].shape == expected.shape
    assert inputs["num_patches_list"] == [expected.shape[0]]
    assert (inputs["pixel_values"] - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_pixel_values_of_non_rgb_images_match_internvl_convert_rgb(processor, mode):
    # InternVL converts with PIL's convert("RGB") (alpha dropped, not blended onto white as transformers would).
    image = random_image(700, 500, seed=3, mode="RGBA" if mode == "RGBA" else "RGB")
    if mode != "RGBA":
        image = image.convert(mode)
    expected = internvl_pixel_values(image)
    pixel_values = processor(text="<image>", images=image)["pixel_values"]
    assert pixel_values.shape == expected.shape == (13, 3, TILE, TILE)  # 700:500 is closest to a 4x3 grid
    assert (pixel_values - expected).abs().max().item() <= 1e-6


def test_images_as_path_bytes_and_array_give_the_same_pixels(processor, tmp_path):
    image = random_image(640, 480, seed=5)
    image.save(tmp_path / "image.png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected = processor(text="<image>", images=image)["pixel_values"]
    for source in (tmp_path / "image.png", str(tmp_path / "image.png"), buffer.getvalue(), np.array(image)):
        assert torch.equal(processor(text="<image>", images=source)["pixel_values"], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts: InternVL2.5's template, exactly
# ---------------------------------------------------------------------------------------------------------------------


def test_prompt_text_matches_internvl_reference_prompts():
    cases = expected_cases(QWEN2)
    assert build_internvl_prompt("Count to 3.") == cases["chat_text_only"]["text"]
    history = [("你好", "你好！有什么可以帮你的？")]
    assert build_internvl_prompt("Count to 3.", history=history) == cases["chat_multiturn"]["text"]
    assert INTERNVL2_5_SYSTEM_MESSAGE.startswith("你是书生·万象")
    assert build_internvl_prompt("Hi", system_message="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "question, history, system",
    [
        ("Describe.", (), None),
        ("Q3", (("Q1", "A1"), ("Q2", "A2")), None),
        ("Q", (), "自定义"),
        ("", (), None),  # an empty message is the bare role header in InternVL's template
        ("Q2", (("Q1", ""),), ""),
    ],
)
def test_prompt_matches_internvl_template_rule(question, history, system):
    expected = internvl_prompt(question, history, INTERNVL2_5_SYSTEM_MESSAGE if system is None else system)
    assert build_internvl_prompt(question, history=list(history), system_message=system) == expected


def test_image_placeholder_is_prepended_only_when_absent():
    assert build_internvl_prompt("What is it?", num_images=1) == internvl_prompt("<image>\nWhat is it?")
    assert build_internvl_prompt("A <image> B", num_images=1) == internvl_prompt("A <image> B")
    assert build_internvl_prompt("Compare.", num_images=2) == internvl_prompt("<image>\n<image>\nCompare.")
    assert build_internvl_prompt("What is it?") == internvl_prompt("What is it?")


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([{"role": "user", "content": "Count to 3."}], build_internvl_prompt("Count to 3.")),
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            build_internvl_prompt("What is it?", num_images=1),
        ),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": [{"type": "text", "text": "Count to 3."}]},
            ],
            build_internvl_prompt("Count to 3.", history=[("你好", "你好！")], system_message="Be brief."),
        ),
        (
            [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ],
            internvl_prompt("Q") + "A<|im_end|>\n",
        ),
    ],
)
def test_apply_chat_template_equals_build_internvl_prompt(processor, messages, expected):
    assert processor.apply_chat_template(messages) == expected


def test_apply_chat_template_tokenized_equals_processor_call(processor, tmp_path):
    image = random_image(900, 450, seed=9)
    image.save(tmp_path / "image.png")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(tmp_path / "image.png")}, {"type": "text", "text": "What?"}],
        }
    ]
    tokenized = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    direct = processor(build_internvl_prompt("What?", num_images=1), images=image)
    assert torch.equal(tokenized["input_ids"], direct["input_ids"])
    assert torch.equal(tokenized["pixel_values"], direct["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------------
# Ids: placeholder expansion, reference ids, padding
# ---------------------------------------------------------------------------------------------------------------------


def test_image_placeholder_expands_to_256_context_tokens_per_tile(processor, qwen2_tokenizer):
    prompt = build_internvl_prompt("Describe.", num_images=1)
    inputs = processor(prompt, images=random_image(896, 448))  # 2x1 grid + thumbnail = 3 tiles
    ids = inputs["input_ids"][0].tolist()
    assert inputs["num_patches_list"] == [3]
    assert inputs["pixel_values"].shape == (3, 3, TILE, TILE)
    assert ids.count(IMG_CONTEXT) == 256 * 3
    start = ids.index(IMG_START)
    assert ids.count(IMG_START) == ids.count(IMG_END) == 1
    assert ids[start + 1 : start + 1 + 768] == [IMG_CONTEXT] * 768 and ids[start + 769] == IMG_END
    before, after = prompt.split("<image>")
    assert ids[:start] == qwen2_tokenizer(before)["input_ids"]
    assert ids[start + 770 :] == qwen2_tokenizer(after)["input_ids"]
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]


def test_several_images_expand_in_order(processor):
    prompt = build_internvl_prompt("Image-1: <image>\nImage-2: <image>\nCompare.")
    inputs = processor(prompt, images=[random_image(448, 448), random_image(1344, 448)])  # 1 tile, 3x1 + thumb
    ids = inputs["input_ids"][0].tolist()
    assert inputs["num_patches_list"] == [1, 4]
    assert inputs["pixel_values"].shape == (5, 3, TILE, TILE)
    starts = [index for index, token in enumerate(ids) if token == IMG_START]
    ends = [index for index, token in enumerate(ids) if token == IMG_END]
    assert [end - start - 1 for start, end in zip(starts, ends)] == [256, 1024]
    assert ids.count(IMG_CONTEXT) == 256 * 5


@pytest.mark.parametrize(
    "folder, case, image_seq_length, size, question",
    [
        (QWEN2, "chat_image_256", 256, (448, 448), "What is in the picture?"),
        # 3x1 grid + thumbnail = 4 tiles of 1 token: the reference prompt's 4 <IMG_CONTEXT>
        (QWEN2, "chat_image", 1, (1344, 448), "Please describe the image shortly."),
        (INTERNLM2, "chat_image_256", 256, (448, 448), "What is in the picture?"),
        (INTERNLM2, "chat_image", 1, (1344, 448), "Please describe the image shortly."),
        (QWEN2, "chat_text_only", 256, None, "Count to 3."),
        (INTERNLM2, "chat_multiturn", 256, None, "Count to 3."),
    ],
)
def test_ids_equal_internvl_reference_ids(qwen2_tokenizer, folder, case, image_seq_length, size, question):
    if folder == QWEN2:
        tokenizer = qwen2_tokenizer
    else:
        tokenizer = convert_tokenizer(INTERNLM2, 1009)
    processor = ArmorProcessor(tokenizer=tokenizer, image_seq_length=image_seq_length, num_image_codes=NUM_CODES)
    expected = expected_cases(folder)[case]
    history = [("你好", "你好！有什么可以帮你的？")] if case == "chat_multiturn" else None
    prompt = build_internvl_prompt(question, history=history, num_images=0 if size is None else 1)
    assert prompt.replace("<image>", "") == expected["text"].replace("<img>", "").replace("<IMG_CONTEXT>", "").replace(
        "</img>", ""
    )
    inputs = processor(prompt, images=None if size is None else random_image(*size))
    assert inputs["input_ids"][0].tolist() == expected["ids"]  # InternLM2's starts with <s> = 1, as in chat()


def test_batch_is_left_padded(processor, qwen2_tokenizer):
    prompts = [build_internvl_prompt("Hi"), build_internvl_prompt("A much longer question about the picture.")]
    inputs = processor(prompts)
    short, long = (qwen2_tokenizer(prompt)["input_ids"] for prompt in prompts)
    width = len(long)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (2, width)
    assert inputs["input_ids"][0].tolist() == [PAD] * (width - len(short)) + short
    assert inputs["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert inputs["input_ids"][1].tolist() == long and inputs["attention_mask"][1].tolist() == [1] * width
    assert "pixel_values" not in inputs


def test_batch_with_images_per_prompt(processor):
    prompts = [
        build_internvl_prompt("A", num_images=1),
        build_internvl_prompt("B"),
        build_internvl_prompt("C", num_images=2),
    ]
    images = [[random_image(448, 448)], [], [random_image(448, 448, seed=1), random_image(896, 448)]]
    inputs = processor(prompts, images=images)
    assert inputs["num_patches_list"] == [1, 1, 3]
    assert inputs["pixel_values"].shape == (5, 3, TILE, TILE)
    counts = (inputs["input_ids"] == IMG_CONTEXT).sum(dim=1).tolist()
    assert counts == [256, 0, 256 * 4]
    flat = processor(prompts, images=[image for row in images for image in row])
    assert torch.equal(flat["input_ids"], inputs["input_ids"])


def test_padding_to_max_length_and_no_padding(processor, qwen2_tokenizer):
    prompt = build_internvl_prompt("Hi")
    length = len(qwen2_tokenizer(prompt)["input_ids"])
    padded = processor(prompt, padding="max_length", max_length=length + 5)
    assert padded["input_ids"][0].tolist()[:5] == [PAD] * 5
    longer = build_internvl_prompt("A longer question")
    unpadded = processor([prompt, longer], padding=False, return_tensors=None)
    assert [len(row) for row in unpadded["input_ids"]] == [length, len(qwen2_tokenizer(longer)["input_ids"])]
    assert unpadded["attention_mask"][0] == [1] * length
    with pytest.raises(ValueError, match="Rows have different lengths"):
        processor([prompt, longer], padding=False)


def test_negative_prompt_is_templated_and_padded_like_the_prompts(processor, qwen2_tokenizer):
    prompts = [build_internvl_prompt("Draw a cat."), build_internvl_prompt("Draw a red bicycle by the sea.")]
    inputs = processor(prompts, negative_prompt="")
    negative = qwen2_tokenizer(build_internvl_prompt(""))["input_ids"]
    width = inputs["input_ids"].shape[1]
    assert inputs["negative_prompt_ids"].shape == inputs["negative_prompt_attention_mask"].shape == (2, width)
    for row in range(2):
        assert inputs["negative_prompt_ids"][row].tolist() == [PAD] * (width - len(negative)) + negative
        assert inputs["negative_prompt_attention_mask"][row].sum().item() == len(negative)
    # A negative prompt longer than every prompt pads the prompts too.
    long_negative = "blurry, " * 30
    inputs = processor(build_internvl_prompt("Cat."), negative_prompt=long_negative)
    negative = qwen2_tokenizer(build_internvl_prompt(long_negative))["input_ids"]
    assert inputs["negative_prompt_ids"][0].tolist() == negative
    assert inputs["input_ids"].shape[1] == len(negative) and inputs["input_ids"][0, 0].item() == PAD


# ---------------------------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------------------------


def test_placeholder_and_image_counts_must_agree(processor):
    two = build_internvl_prompt("<image> and <image>")
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        processor(two, images=random_image(64, 64))
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        processor(build_internvl_prompt("x", num_images=1), images=[random_image(64, 64), random_image(64, 64)])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        processor(build_internvl_prompt("x", num_images=1))
    with pytest.raises(ValueError, match=r"Prompt 1 has 0 <image> placeholder\(s\) but 1 image\(s\)"):
        processor(["<image>", "none"], images=[[random_image(64, 64)], [random_image(64, 64)]])


def test_unreadable_images_raise_clear_errors(processor, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt is not an image file"):
        processor("<image>", images=tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="12 bytes given .* are not an image file"):
        processor("<image>", images=b"not an image")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        processor("<image>", images=str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="Unsupported image type dict"):
        processor("<image>", images={"image": 1})
    with pytest.raises(ValueError, match="uint8"):
        processor("<image>", images=np.zeros((8, 8, 3), dtype=np.float32))


def test_expanded_image_tokens_in_text_are_rejected(processor):
    with pytest.raises(ValueError, match="already contains <img> or <IMG_CONTEXT>"):
        processor("<img><IMG_CONTEXT></img>")


def test_tokenizer_without_armor_tokens_is_rejected(tmp_path):
    for name in QWEN2_TOKENIZER_FILES:
        shutil.copy(QWEN2 / name, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no <imgbos> token"):
        ArmorProcessor(tokenizer=tokenizer)
    tokenizer.add_tokens(["<imgbos>", "<imgend>", "<imgpad>", "<extra>"], special_tokens=True)
    with pytest.raises(ValueError, match="len\\(tokenizer\\) is 1016"):
        ArmorProcessor(tokenizer=tokenizer)


def test_num_image_codes_must_be_a_square(qwen2_tokenizer):
    with pytest.raises(ValueError, match="square"):
        ArmorProcessor(tokenizer=qwen2_tokenizer, num_image_codes=1000)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: generated ids -> text and images
# ---------------------------------------------------------------------------------------------------------------------


def image_span(codes: list[int]) -> list[int]:
    return [IMGBOS] + [OFFSET + code for code in codes] + [IMGEND]


def test_decode_splits_text_image_text(drawing_processor, qwen2_tokenizer, vqgan):
    codes = [(7 * index + 3) % 64 for index in range(NUM_CODES)]
    before, after = qwen2_tokenizer("Here it is:")["input_ids"], qwen2_tokenizer(" a cat.")["input_ids"]
    ids = before + image_span(codes) + after + [IM_END, PAD, PAD]
    segments = drawing_processor.decode(torch.tensor(ids))
    assert [type(segment) for segment in segments] == [str, Image.Image, str]
    assert segments[0] == "Here it is:" and segments[2] == " a cat."
    assert segments[1].size == (64, 64) and segments[1].mode == "RGB"
    expected = vqgan.decode(torch.tensor(codes).view(1, 4, 4), output_type="pil")[0]
    assert np.array_equal(np.array(segments[1]), np.array(expected))
    assert drawing_processor.decode(ids, skip_special_tokens=False)[2] == " a cat.<|im_end|><|endoftext|><|endoftext|>"


def test_batch_decode_returns_one_list_per_row(drawing_processor, qwen2_tokenizer):
    text = qwen2_tokenizer("Done.")["input_ids"]
    rows = torch.tensor([[PAD] * 3 + text + image_span(list(range(16))), image_span([0] * 16) + text + [PAD] * 3])
    decoded = drawing_processor.batch_decode(rows)
    assert [[type(segment) for segment in row] for row in decoded] == [[str, Image.Image], [Image.Image, str]]
    assert decoded[0][0] == decoded[1][1] == "Done."


def test_text_only_decode_never_loads_the_vqgan(processor, qwen2_tokenizer):
    assert processor.decode(qwen2_tokenizer("plain text")["input_ids"] + [IM_END]) == ["plain text"]
    assert processor._vqgan is None


@pytest.mark.parametrize(
    "ids, message",
    [
        ([5, IMGBOS] + [OFFSET] * 15 + [IMGEND], r"Position 17: id 1013 inside the image span starting at position 1"),
        (
            [5, IMGBOS] + [OFFSET] * 16 + [5],
            r"starting at position 1 must close with <imgend> \(1013\) at position 18",
        ),
        ([5, IMGBOS] + [OFFSET] * 16, r"position 18 after 16 codes, found the end of the sequence"),
        ([5, IMGBOS] + [OFFSET] * 9, r"starting at position 1 ends after 9 of 16 codes"),
        ([5, OFFSET + 1, 6], r"Position 1: image code id 1016 outside an <imgbos> ... <imgend> span"),
        ([IMGBOS] + [OFFSET] * 4 + [OFFSET + 64] + [OFFSET] * 11 + [IMGEND], r"Position 5: id 1079 is past the last"),
        ([3, -1], r"Position 1: negative token id -1"),
    ],
)
def test_malformed_image_spans_raise_with_position(drawing_processor, ids, message):
    with pytest.raises(ValueError, match=message):
        drawing_processor.decode(ids)


def test_encode_image_target_round_trips_through_decode(drawing_processor, vqgan):
    image = Image.open(VQGAN / "pil_input.png")
    target = drawing_processor.encode_image_target(image)
    codes = vqgan.encode(image, image_size=64)
    assert drawing_processor.generated_image_size == 64
    assert len(target) == NUM_CODES + 2 and target[0] == IMGBOS and target[-1] == IMGEND
    assert target[1:-1] == (codes.flatten() + OFFSET).tolist()
    assert all(OFFSET <= token < OFFSET + 64 for token in target[1:-1])
    (drawn,) = drawing_processor.decode(target)
    expected = vqgan.decode(codes, output_type="pil")[0]
    assert np.array_equal(np.array(drawn), np.array(expected))


def test_vqgan_needed_but_missing_raises(processor):
    with pytest.raises(ValueError, match="has no VQGAN"):
        processor.decode(image_span([0] * 16))
    with pytest.raises(TypeError, match="must be an ArmorVQGANModel"):
        ArmorProcessor(tokenizer=processor.tokenizer, vqgan="vqgan.ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_then_auto_processor_round_trip(qwen2_tokenizer, vqgan, tmp_path):
    folder = tmp_path / "armor-checkpoint"
    original = ArmorProcessor(tokenizer=qwen2_tokenizer, image_seq_length=256, num_image_codes=NUM_CODES)
    original.save_pretrained(folder)
    vqgan.save_pretrained(folder / "vqgan")

    config = json.loads((folder / "processor_config.json").read_text())
    assert config == {
        "auto_map": {"AutoProcessor": "processing_armor.ArmorProcessor"},
        "image_seq_length": 256,
        "num_image_codes": NUM_CODES,
        "processor_class": "ArmorProcessor",
    }
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["crop_to_patches"] and (preprocessor["min_patches"], preprocessor["max_patches"]) == (1, 12)
    assert (folder / "chat_template.jinja").read_text() == original.chat_template
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists()
    for name in CODE_FILES:  # the code files a Hub repo holds, written by save_pretrained
        assert filecmp.cmp(folder / name, REPO_ROOT / name, shallow=False), name

    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "ArmorProcessor" and type(loaded).__module__.startswith("transformers_modules")
    assert (loaded.image_seq_length, loaded.num_image_codes, loaded.image_code_offset) == (256, NUM_CODES, OFFSET)
    assert len(loaded.tokenizer) == len(qwen2_tokenizer) == QWEN2_V + 3
    assert type(loaded.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert loaded.image_processor.to_dict() == original.image_processor.to_dict()
    assert loaded.chat_template == original.chat_template

    prompt = build_internvl_prompt("Describe.", num_images=1)
    image = random_image(700, 300, seed=11)
    expected = original(prompt, images=image, negative_prompt="")
    actual = loaded(prompt, images=image, negative_prompt="")
    assert actual.keys() == expected.keys()
    for key in ("input_ids", "attention_mask", "pixel_values", "negative_prompt_ids"):
        assert torch.equal(actual[key], expected[key]), key
    assert loaded._vqgan is None  # text and input images never load the VQGAN

    codes = list(range(16))
    (drawn,) = loaded.decode(image_span(codes))  # first image span: the VQGAN is read from vqgan/
    assert loaded._vqgan is not None
    reference = vqgan.decode(torch.tensor(codes).view(1, 4, 4), output_type="pil")[0]
    assert np.array_equal(np.array(drawn), np.array(reference))


def test_from_pretrained_without_tokenizer_folder_explains(qwen2_tokenizer, tmp_path):
    ArmorProcessor(tokenizer=qwen2_tokenizer, num_image_codes=NUM_CODES).save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(OSError, match="keeps its tokenizer in tokenizer/"):
        ArmorProcessor.from_pretrained(tmp_path)


def test_grid_side_of_decoded_images_follows_num_image_codes(qwen2_tokenizer, vqgan):
    processor = ArmorProcessor(tokenizer=qwen2_tokenizer, num_image_codes=64, vqgan=vqgan)
    (image,) = processor.decode(image_span([1] * 64))
    assert image.size == (8 * 16, 8 * 16) == (math.isqrt(64) * vqgan.config.downsample_factor,) * 2
