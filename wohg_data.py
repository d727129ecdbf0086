"""WoHG training data for ARMOR: conversation records in, token ids and labels out; target images as cached codes.

Records: one JSON object per line of a `.jsonl` file. A data source is such a file or a folder of them (its `*.jsonl`
files, sorted). Image paths are relative to the file that names them (absolute paths work too).

* Paper / InternVL layout:
  `{"conversations": [{"from": "human", "value": "<image>\\nWhat is this photo about?"}, {"from": "gpt", "value":
  "..."}], "image": ["photo.jpg"]}`. `image` (or `images`) is one path or a list. Each `<image>` of the conversation
  takes the next image of that list, in order. In a human turn it is an INPUT image (tiled as InternVL2.5 does and
  expanded to `<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>`). In a gpt turn it is a TARGET: an image the model
  must draw at that point of its answer, written `<imgbos>` + its VQGAN codes + `<imgend>`.
* InterSyn layout: a turn carries its own images,
  `{"from": "gpt", "value": "...", "caption": "...", "image": "x.png"}`. A turn's own images fill its own `<image>`
  placeholders; without placeholders they go after the text in a gpt turn (InterSyn's placement) and before it, as
  `<image>\\n`, in a human turn (InternVL's). `caption` (InterSyn's description of the image) is not part of the
  answer and is not trained on. The flat columns of InterSyn's release
  (`human1`, `gpt1`, `caption1`, `image1`, `human2`, ...) are read as the same conversation.
* A first turn `{"from": "system", "value": ...}` replaces InternVL2.5's system message. Roles: `human`/`user`,
  `gpt`/`assistant`, `system`; `role`/`content` may stand for `from`/`value`.

Kinds, by what goes in and what comes out: t2t, ti2t (understanding), t2i (text to image), t2ti, ti2ti (interleaved
answers), ti2i (editing); several turns are one record.

Token ids follow InternVL2.5's chat template (`processing_armor.build_internvl_prompt`), so the prompt of a turn is
exactly what `ArmorProcessor` gives at inference. Each part is tokenized on its own (system block, user block,
`<|im_start|>assistant\\n`, answer text, `<|im_end|>`, `\\n`), as InternVL's own fine-tuning does. Labels (`-100` is
ignored): only the answers count, i.e. the answer text, each target image's `<imgbos>`, codes and `<imgend>`, and the
`<|im_end|>` that ends the answer (where generation stops). The system and user blocks, the assistant header, the
`<IMG_CONTEXT>` runs and the newline after `<|im_end|>` are -100.

Target images are encoded ONCE, offline, by the VQGAN (`python wohg_data.py tokenize ...`) into a cache next to the
data: `<folder>/armor_image_codes/` for a folder, `<dir>/<name>.armor_image_codes/` for `<dir>/<name>.jsonl`. A cache
is `vqgan-<fingerprint>-<size>px.safetensors` (codes, one row per image) + `.json` (per image path relative to the
data: row, sha256, size and mtime of the file). The fingerprint hashes the VQGAN's config and weights, so another
VQGAN or another image size never reuses codes; a changed image file (new sha256) is stale. Training reads only the
cache and stops with the command to run when codes are missing or stale.

    python wohg_data.py tokenize --data DATA [DATA ...] --model CHECKPOINT [--batch-size 32] [--device cuda]
    python wohg_data.py check --data DATA [DATA ...] --model CHECKPOINT
"""

import argparse
import copy
import hashlib
import io
import json
import logging
import math
import os
import random
import secrets
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import armor_package  # noqa: F401  (registers the package `armor`)

# isort: split
from armor.processing_armor import (
    ASSISTANT_HEADER,
    END_OF_TURN,
    IMAGE_PLACEHOLDER,
    INTERNVL2_5_SYSTEM_MESSAGE,
    SYSTEM_HEADER,
    USER_HEADER,
    VQGAN_SUBFOLDER,
    ArmorProcessor,
)

logger = logging.getLogger("wohg")

IGNORE_INDEX = -100
END_OF_TURN_TOKEN = END_OF_TURN.removesuffix("\n")  # "<|im_end|>": the token that ends a turn
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CACHE_FORMAT = 2  # 2: the codes file and its index share a random nonce (format 1 had none)
CACHE_FOLDER = "armor_image_codes"
KINDS = ("t2t", "ti2t", "t2i", "ti2i", "t2ti", "ti2ti")


class RecordError(ValueError):
    """A record that cannot be trained on; the message names the file, the line and the record id."""

    def __init__(self, location: str, problem: str):
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem


class CacheError(RuntimeError):
    """The image-code cache is missing, stale or built for another VQGAN; the message says what to run."""


class InconsistentCacheError(CacheError):
    """A cache whose codes file and index do not belong together (a crash while writing) or of an unknown format."""


# ---------------------------------------------------------------------------------------------------------------------
# Records -> conversations
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageRef:
    path: Path  # absolute, normalised
    target: bool  # True: an image to draw (gpt turn); False: an input image (human turn)


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    pieces: list  # str and ImageRef, in order


@dataclass
class Conversation:
    location: str  # "path/to/file.jsonl:LINE (id=...)"
    source: int  # index of the data source (whose cache holds the codes)
    system: str | None
    turns: list[Turn]

    def images(self, target: bool) -> list[ImageRef]:
        return [p for turn in self.turns for p in turn.pieces if isinstance(p, ImageRef) and p.target == target]

    @property
    def kind(self) -> str:
        """t2t, ti2t, t2i, ti2i, t2ti or ti2ti: text (+ input images) in, text and/or drawn images out."""
        answer_text = any(
            isinstance(p, str) and p.strip() for turn in self.turns if turn.role == "assistant" for p in turn.pieces
        )
        into = "ti" if self.images(target=False) else "t"
        out = ("t" if answer_text else "") + ("i" if self.images(target=True) else "")
        return f"{into}2{out}"


def jsonl_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(source.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"The data folder {source} holds no *.jsonl files.")
        return files
    raise FileNotFoundError(f"Data source {source} does not exist; pass a .jsonl file or a folder of them.")


def _as_paths(value, location: str, what: str) -> list[str]:
    if value is None or value == "":
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise RecordError(location, f"`{what}` must be an image path or a list of image paths, got {value!r}.")
    return list(values)


def _flat_intersyn_turns(raw: dict) -> list[dict]:
    """InterSyn's released columns (human1, gpt1, caption1, image1, human2, ...) as a list of turns."""
    turns, index = [], 1
    while f"human{index}" in raw or f"gpt{index}" in raw:
        if raw.get(f"human{index}") is not None:
            turns.append({"from": "human", "value": raw[f"human{index}"]})
        if raw.get(f"gpt{index}") is not None or raw.get(f"image{index}"):
            turns.append(
                {
                    "from": "gpt",
                    "value": raw.get(f"gpt{index}") or "",
                    "caption": raw.get(f"caption{index}"),
                    "image": raw.get(f"image{index}"),
                }
            )
        index += 1
    return turns


def parse_record(raw, location: str, base_dir: Path, source: int = 0) -> Conversation:
    """One record (either layout) -> a Conversation; raises RecordError naming `location` for anything malformed."""
    if not isinstance(raw, dict):
        raise RecordError(location, f"a record must be a JSON object, got {type(raw).__name__}.")
    turns_raw = raw.get("conversations")
    if turns_raw is None and ("human1" in raw or "gpt1" in raw):
        turns_raw = _flat_intersyn_turns(raw)
    if turns_raw is None:
        raise RecordError(location, "has no `conversations` list (nor InterSyn's human1/gpt1/... columns).")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise RecordError(location, "has an empty conversation; give at least one human and one gpt turn.")
    if "image" in raw and "images" in raw:
        raise RecordError(location, "has both `image` and `images`; use one list.")
    shared = _as_paths(raw.get("image", raw.get("images")), location, "image")
    next_shared = 0

    def resolve(path: str) -> Path:
        if path.startswith(("http://", "https://")):
            raise RecordError(location, f"image {path} is a URL; download it and give a path relative to the file.")
        return Path(os.path.normpath(base_dir / path))

    system, turns = None, []
    for index, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise RecordError(location, f"turn {index} must be an object with `from` and `value`, got {turn!r}.")
        role_name = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content", ""))
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise RecordError(location, f"turn {index}: `value` must be a string, got {type(value).__name__}.")
        if role_name == "system":
            if index != 0:
                raise RecordError(location, f"turn {index} is a system turn; a system message may only come first.")
            system = value
            continue
        role = ROLES.get(role_name)
        if role is None:
            raise RecordError(
                location,
                f"turn {index} has unknown role {role_name!r}; use human or gpt (user / assistant), and system only "
                "as the first turn.",
            )
        own = _as_paths(turn.get("image", turn.get("images")), location, f"turns[{index}].image")
        count = value.count(IMAGE_PLACEHOLDER)
        if own:
            if count and count != len(own):
                raise RecordError(
                    location,
                    f"turn {index} has {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(own)} image(s) of its own; "
                    "give one placeholder per image, or none to place them automatically.",
                )
            if not count:
                value = (
                    (IMAGE_PLACEHOLDER + "\n") * len(own) + value
                    if role == "user"
                    else value + IMAGE_PLACEHOLDER * len(own)
                )
            paths = own
        else:
            if next_shared + count > len(shared):
                raise RecordError(
                    location,
                    f"has more {IMAGE_PLACEHOLDER} placeholders than images: turn {index} needs image "
                    f"{next_shared + count} but the record lists {len(shared)}.",
                )
            paths = shared[next_shared : next_shared + count]
            next_shared += count
        texts = value.split(IMAGE_PLACEHOLDER)
        pieces = [texts[0]] if texts[0] else []
        for path, text in zip(paths, texts[1:]):
            pieces.append(ImageRef(resolve(path), target=role == "assistant"))
            if text:
                pieces.append(text)
        if role == "assistant" and not pieces:
            raise RecordError(location, f"turn {index} (gpt) is empty: no text and no image to learn.")
        turns.append(Turn(role, pieces))
    if next_shared != len(shared):
        raise RecordError(
            location,
            f"lists {len(shared)} images but only {next_shared} {IMAGE_PLACEHOLDER} placeholder(s) use them; write "
            f"one {IMAGE_PLACEHOLDER} per image where it belongs.",
        )
    if not any(turn.role == "assistant" for turn in turns):
        raise RecordError(location, "has no gpt turn: nothing to train on.")
    return Conversation(location, source, system, turns)


def read_conversations(
    sources: list[Path], skip_bad_records: bool = False, check_images: bool = True, num_threads: int = 16
) -> tuple[list[Conversation], list[str]]:
    """
    Every record of the sources, checked: JSON, layout, roles, placeholder counts, image files present, and with
    `check_images` input images readable (targets are read by `tokenize`). Returns (conversations, skipped), where
    `skipped` holds the error message of each record left out; without `skip_bad_records` the first error is raised.
    """
    conversations, skipped = [], []

    def reject(error: RecordError):
        if not skip_bad_records:
            raise error
        skipped.append(str(error))

    for source_index, source in enumerate(sources):
        for file in jsonl_files(source):
            with open(file, encoding="utf-8") as lines:
                for line_number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    location = f"{file}:{line_number}"
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as error:
                        reject(RecordError(location, f"is not valid JSON ({error})."))
                        continue
                    if isinstance(raw, dict) and raw.get("id") is not None:
                        location += f" (id={raw['id']})"
                    try:
                        conversation = parse_record(raw, location, file.parent, source_index)
                        for image in conversation.images(False) + conversation.images(True):
                            if not image.path.is_file():
                                raise RecordError(
                                    location, f"image {image.path} does not exist (paths are relative to {file})."
                                )
                    except RecordError as error:
                        reject(error)
                        continue
                    conversations.append(conversation)

    if check_images:
        inputs = sorted({image.path for c in conversations for image in c.images(False)})
        with ThreadPoolExecutor(num_threads) as pool:
            problems = dict(zip(inputs, pool.map(_image_problem, inputs)))
        kept = []
        for conversation in conversations:
            bad = next((i.path for i in conversation.images(False) if problems[i.path]), None)
            if bad is None:
                kept.append(conversation)
                continue
            reject(RecordError(conversation.location, f"input image {bad} cannot be read: {problems[bad]}."))
        conversations = kept
    return conversations, skipped


def _image_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 - any decoding failure makes the image unusable
        return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The image-code cache
# ---------------------------------------------------------------------------------------------------------------------


def cache_dir_for(source: Path) -> Path:
    """Where the codes of a data source live: inside its folder, or beside its .jsonl file."""
    return source / CACHE_FOLDER if source.is_dir() else source.parent / f"{source.stem}.{CACHE_FOLDER}"


def vqgan_folder_of(model: str | os.PathLike) -> Path:
    """The local `vqgan/` folder of an ARMOR checkpoint (a local folder, or a Hub repo fetched to the HF cache)."""
    folder = Path(model) / VQGAN_SUBFOLDER
    if folder.is_dir():
        return folder
    if Path(model).exists():
        raise FileNotFoundError(
            f"{model} has no {VQGAN_SUBFOLDER}/ folder; an ARMOR checkpoint keeps its VQGAN there."
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), allow_patterns=[f"{VQGAN_SUBFOLDER}/*"])) / VQGAN_SUBFOLDER


def vqgan_fingerprint(vqgan_folder: Path) -> str:
    """sha256 of the VQGAN's config (what shapes the codes) and of every weight tensor, read from its files."""
    from safetensors import safe_open

    config = json.loads((vqgan_folder / "config.json").read_text())
    ignored = {"transformers_version", "architectures", "dtype", "torch_dtype"}
    config = {key: value for key, value in config.items() if key not in ignored and not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weight_files = sorted(vqgan_folder.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"{vqgan_folder} holds no *.safetensors weights.")
    for weight_file in weight_files:
        with safe_open(str(weight_file), framework="pt") as tensors:
            for name in sorted(tensors.keys()):
                tensor = tensors.get_tensor(name).contiguous().reshape(-1)
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_name(fingerprint: str, image_size: int) -> str:
    return f"vqgan-{fingerprint[:16]}-{image_size}px"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageCodeCache:
    """The codes of one data source's target images for one VQGAN at one image size (read-only, opened lazily)."""

    def __init__(
        self, directory: Path, fingerprint: str, image_size: int, num_codes: int, discard_invalid: bool = False
    ):
        """
        An index of an unknown format, or one whose codes file is not the one written with it (a crash between the
        two renames of `_write_cache`), raises InconsistentCacheError; with `discard_invalid` (tokenize, which
        rebuilds it) the cache is treated as empty and `discarded` says why.
        """
        self.directory = directory
        self.base = directory.parent
        self.name = cache_name(fingerprint, image_size)
        self.index_path = directory / f"{self.name}.json"
        self.codes_path = directory / f"{self.name}.safetensors"
        self.fingerprint, self.image_size, self.num_codes = fingerprint, image_size, num_codes
        self.entries, self.bad, self.discarded = {}, {}, None
        if self.index_path.is_file():
            index = json.loads(self.index_path.read_text())
            problem = self._inconsistency(index)
            if problem and not discard_invalid:
                raise InconsistentCacheError(
                    f"Stale/inconsistent image-code cache: {problem}. Re-run `python wohg_data.py tokenize ...` "
                    "(same --data and --model), which rebuilds it."
                )
            if problem:
                self.discarded = problem
            elif index.get("vqgan_fingerprint") != fingerprint or index.get("num_codes") != num_codes:
                raise CacheError(
                    f"{self.index_path} was written for another VQGAN or grid; delete it and re-run tokenize."
                )
            else:
                self.entries, self.bad = index["entries"], index.get("bad", {})
        self._codes = None

    def _inconsistency(self, index: dict) -> str | None:
        """Why the index and the codes file cannot be used together, or None (format and shared nonce checked)."""
        if index.get("format") != CACHE_FORMAT:
            return f"{self.index_path} has cache format {index.get('format')!r}; this code reads format {CACHE_FORMAT}"
        if not self.codes_path.is_file():
            return f"{self.index_path} has no codes file {self.codes_path.name} beside it"
        from safetensors import safe_open

        with safe_open(str(self.codes_path), framework="pt") as codes:
            nonce = (codes.metadata() or {}).get("nonce")
        if nonce is None or nonce != index.get("nonce"):
            return (
                f"{self.codes_path} was not written with its index {self.index_path.name} (an interrupted tokenize?), "
                "so the index's rows may point at other images' codes"
            )
        return None

    @property
    def exists(self) -> bool:
        return self.index_path.is_file() and self.codes_path.is_file()

    def key(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.base)).as_posix()

    def status(self, path: Path) -> str:
        """ok, missing, stale (the file changed since it was encoded) or "bad: <why tokenize could not read it>"."""
        key = self.key(path)
        if key in self.bad:
            return f"bad: {self.bad[key]}"
        entry = self.entries.get(key)
        if entry is None:
            return "missing"
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (entry["bytes"], entry["mtime_ns"]):
            return "ok"
        return "ok" if file_sha256(path) == entry["sha256"] else "stale"

    def codes(self, path: Path) -> list[int]:
        if self._codes is None:
            from safetensors import safe_open

            self._codes = safe_open(str(self.codes_path), framework="pt")
        row = self.entries[self.key(path)]["row"]
        return self._codes.get_slice("codes")[row : row + 1].reshape(-1).long().tolist()

    def __getstate__(self):  # DataLoader workers open their own file handle
        return {**self.__dict__, "_codes": None}

    def other_caches(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(path.stem for path in self.directory.glob("vqgan-*.json") if path.stem != self.name)


def check_cache(
    conversations: list[Conversation], caches: list[ImageCodeCache], model: str, sources: list[Path]
) -> list[tuple]:
    """Raise CacheError when target codes are missing or stale; return (conversation, path, why) for bad targets."""
    problems, bad, seen = {"missing": [], "stale": []}, [], {}
    for conversation in conversations:
        cache = caches[conversation.source]
        for image in conversation.images(True):
            if image.path not in seen:
                seen[image.path] = cache.status(image.path)
                if seen[image.path] in problems:
                    problems[seen[image.path]].append((cache, image.path))
            if seen[image.path].startswith("bad"):
                bad.append((conversation, image.path, seen[image.path][5:]))
    if problems["missing"] or problems["stale"]:
        lines = []
        for status, what in (("missing", "have no codes"), ("stale", "changed since their codes were made")):
            if problems[status]:
                examples = ", ".join(str(path) for _, path in problems[status][:3])
                lines.append(f"{len(problems[status])} target image(s) {what} (e.g. {examples})")
        cache = (problems["missing"] or problems["stale"])[0][0]
        state = "is not up to date" if cache.exists else f"does not exist ({cache.index_path})"
        others = cache.other_caches()
        hint = f" {cache.directory} holds caches for other VQGANs or image sizes: {others}." if others else ""
        raise CacheError(
            f"The image-code cache {cache.name} (this model's VQGAN at {cache.image_size}px) {state}: "
            f"{'; '.join(lines)}.{hint} Encode the target images once (only new or changed ones are encoded):\n"
            f"    {tokenize_command(sources, model)}"
        )
    return bad


def tokenize_command(sources: list[Path], model: str) -> str:
    return f"python wohg_data.py tokenize --data {' '.join(str(source) for source in sources)} --model {model}"


@dataclass
class _VQGANPreprocess:
    """Chameleon's preprocessing (`ArmorVQGANModel.preprocess`, which reads only the config), without the weights,
    so that DataLoader workers can run it."""

    config: object

    def __call__(self, image: Image.Image, image_size: int) -> torch.Tensor:
        from armor.modeling_vqgan import ArmorVQGANModel

        return ArmorVQGANModel.preprocess(self, image, image_size)[0]


def _encode_item(path: Path, image_size: int, preprocess: Callable) -> dict:
    try:
        data = path.read_bytes()
        stat = path.stat()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = preprocess(image, image_size)
    except Exception as error:  # noqa: BLE001 - reported per image
        return {"path": path, "error": f"{type(error).__name__}: {error}"}
    return {
        "path": path,
        "pixels": pixels,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


class _TargetImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], image_size: int, preprocess: Callable):
        self.paths, self.image_size, self.preprocess = paths, image_size, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return _encode_item(self.paths[index], self.image_size, self.preprocess)


def tokenize_images(
    sources: list[Path],
    model: str,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 4,
    skip_bad_records: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """
    Encode every target image of the data through the checkpoint's VQGAN, in batches (GPU when present), into each
    source's cache. Images already in the cache with the same content are kept. A target image that cannot be read
    raises an error naming its record, or with `skip_bad_records` is recorded as bad (training then skips its records).
    """
    from tqdm.auto import tqdm

    from armor.configuration_armor import ArmorConfig
    from armor.modeling_vqgan import ArmorVQGANModel

    config = ArmorConfig.from_pretrained(model)
    image_size, num_codes = config.generated_image_size, config.num_image_codes
    vqgan_folder = vqgan_folder_of(model)
    fingerprint = vqgan_fingerprint(vqgan_folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vqgan = ArmorVQGANModel.from_pretrained(vqgan_folder, dtype=torch.float32).to(device).eval()
    code_dtype = torch.int16 if config.image_codebook_size <= 2**15 else torch.int32
    conversations, skipped = read_conversations(sources, skip_bad_records, check_images=False)
    summary = {
        "vqgan": cache_name(fingerprint, image_size),
        "encoded": 0,
        "kept": 0,
        "bad": 0,
        "skipped_records": len(skipped),
    }
    for message in skipped:
        log(f"skipped: {message}")

    for source_index, source in enumerate(sources):
        cache = ImageCodeCache(cache_dir_for(source), fingerprint, image_size, num_codes, discard_invalid=True)
        if cache.discarded:
            log(f"rebuilding the cache: {cache.discarded}")
        owners = {}
        for conversation in conversations:
            if conversation.source == source_index:
                for image in conversation.images(True):
                    owners.setdefault(image.path, conversation.location)
        kept, todo = {}, []
        old_codes = None
        for path in sorted(owners):
            status = cache.status(path) if cache.exists else "missing"
            if status == "ok":
                kept[cache.key(path)] = cache.entries[cache.key(path)]
            else:
                todo.append(path)
        if kept:
            from safetensors.torch import load_file

            old_codes = load_file(str(cache.codes_path))["codes"]
        rows = [old_codes[entry["row"]] for entry in kept.values()] if kept else []
        entries = {key: {**entry, "row": i} for i, (key, entry) in enumerate(kept.items())}
        bad = {}
        loader = torch.utils.data.DataLoader(
            _TargetImages(todo, image_size, _VQGANPreprocess(vqgan.config)),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=list,
        )
        bar = tqdm(total=len(todo), desc=f"VQGAN codes {source.name}", unit="img", disable=not progress or not todo)
        for items in loader:
            good = [item for item in items if "error" not in item]
            for item in items:
                if "error" in item:
                    message = f"target image {item['path']} cannot be read: {item['error']}."
                    if not skip_bad_records:
                        raise RecordError(owners[item["path"]], message)
                    bad[cache.key(item["path"])] = item["error"]
                    log(f"bad: {owners[item['path']]}: {message}")
            if good:
                codes = vqgan.encode(torch.stack([item["pixels"] for item in good]))
                if codes[0].numel() != num_codes:
                    raise ValueError(
                        f"The VQGAN gives {codes[0].numel()} codes per {image_size}px image but the model expects "
                        f"{num_codes}; the checkpoint's config and its vqgan/ disagree."
                    )
                for item, row in zip(good, codes.reshape(len(good), -1).cpu().to(code_dtype)):
                    entries[cache.key(item["path"])] = {
                        "row": len(rows),
                        "sha256": item["sha256"],
                        "bytes": item["bytes"],
                        "mtime_ns": item["mtime_ns"],
                    }
                    rows.append(row)
            bar.update(len(items))
        bar.close()
        _write_cache(cache, entries, bad, rows, num_codes, code_dtype)
        summary["encoded"] += len(todo) - len(bad)
        summary["kept"] += len(kept)
        summary["bad"] += len(bad)
        log(
            f"{cache.codes_path}: {len(rows)} images ({len(todo) - len(bad)} encoded, {len(kept)} kept, "
            f"{len(bad)} unreadable)"
        )
    return summary


def _write_cache(cache: ImageCodeCache, entries: dict, bad: dict, rows: list, num_codes: int, dtype: torch.dtype):
    """
    Write codes and index beside each other, each through a temporary file and a rename. Both carry the same random
    nonce: a crash between the two renames leaves new codes beside the old index, which reading then refuses
    (InconsistentCacheError) instead of serving renumbered rows; tokenize rebuilds such a cache.
    """
    from safetensors.torch import save_file

    cache.directory.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(16)
    codes = torch.stack(rows) if rows else torch.zeros(0, num_codes, dtype=dtype)
    temporary = cache.codes_path.with_suffix(".tmp")
    save_file({"codes": codes.contiguous()}, str(temporary), metadata={"format": str(CACHE_FORMAT), "nonce": nonce})
    os.replace(temporary, cache.codes_path)
    index = {
        "format": CACHE_FORMAT,
        "nonce": nonce,
        "vqgan_fingerprint": cache.fingerprint,
        "image_size": cache.image_size,
        "num_codes": num_codes,
        "entries": entries,
        "bad": bad,
    }
    temporary = cache.index_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(index))
    os.replace(temporary, cache.index_path)


# ---------------------------------------------------------------------------------------------------------------------
# Conversations -> token ids and labels
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One training sequence, with the spans the unconditional (guidance) variant and truncation need."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    # (start, end) of each assistant turn's answer: from its first answer token to its <|im_end|>\n, end exclusive
    answers: list[tuple[int, int]] = field(default_factory=list)
    # (imgbos position, imgend position, answer index) of each target image
    targets: list[tuple[int, int, int]] = field(default_factory=list)
    # (<img> position, </img> position, first tile, tiles) of each input image
    inputs: list[tuple[int, int, int, int]] = field(default_factory=list)


class ConversationEncoder:
    """InternVL2.5's chat template + ARMOR's image tokens, part by part, with labels on the answers only."""

    def __init__(self, processor: ArmorProcessor, system_message: str | None = None, max_tiles: int | None = None):
        self.tokenizer = processor.tokenizer
        self.image_processor = copy.deepcopy(processor.image_processor)  # its own tile limit, not the checkpoint's
        if max_tiles is not None:
            self.image_processor.max_patches = max_tiles
        self.image_seq_length = processor.image_seq_length
        self.image_token_id = processor.image_token_id
        self.image_start_token_id = processor.image_start_token_id
        self.image_end_token_id = processor.image_end_token_id
        self.imgbos_token_id = processor.imgbos_token_id
        self.imgend_token_id = processor.imgend_token_id
        self.image_code_offset = processor.image_code_offset
        self.system_message = INTERNVL2_5_SYSTEM_MESSAGE if system_message is None else system_message
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
        if self.end_of_turn_id is None or self.end_of_turn_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {END_OF_TURN_TOKEN}; InternVL2.5's chat template needs it.")
        with_specials = self.tokenizer("a")["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        if with_specials[len(with_specials) - len(without) :] != without:
            raise ValueError("The tokenizer adds special tokens after the text; ARMOR expects at most a leading <s>.")
        self.prefix = with_specials[: len(with_specials) - len(without)]  # InternLM2: [<s>]; Qwen2: []

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, conversation: Conversation, codes_of: Callable[[Path], list[int]]) -> Sample:
        ids, labels, tiles, sample = list(self.prefix), [IGNORE_INDEX] * len(self.prefix), [], Sample([], [], None)

        def add(new_ids: list[int], train: bool):
            ids.extend(new_ids)
            labels.extend(new_ids if train else [IGNORE_INDEX] * len(new_ids))

        system = self.system_message if conversation.system is None else conversation.system
        add(self.text_ids(SYSTEM_HEADER + system + END_OF_TURN), False)
        for turn in conversation.turns:
            if turn.role == "user":
                # One block, as the processor tokenizes the prompt; an empty message is its header alone.
                if not turn.pieces:
                    add(self.text_ids(USER_HEADER), False)
                    continue
                pieces = [USER_HEADER, *turn.pieces, END_OF_TURN]
                for piece in pieces:
                    if isinstance(piece, str):
                        add(self.text_ids(piece), False)
                        continue
                    tiles_of_image = self.tile(piece.path, conversation.location)
                    count = len(tiles_of_image)
                    sample.inputs.append((len(ids), len(ids) + count * self.image_seq_length + 1, len(tiles), count))
                    tiles.append(tiles_of_image)
                    context = [self.image_token_id] * (count * self.image_seq_length)
                    add([self.image_start_token_id, *context, self.image_end_token_id], False)
                continue
            add(self.text_ids(ASSISTANT_HEADER), False)
            start = len(ids)
            for piece in turn.pieces:
                if isinstance(piece, str):
                    add(self.text_ids(piece), True)
                    continue
                codes = codes_of(piece.path)
                first = len(ids)
                add([self.imgbos_token_id, *(c + self.image_code_offset for c in codes), self.imgend_token_id], True)
                sample.targets.append((first, len(ids) - 1, len(sample.answers)))
            add([self.end_of_turn_id], True)
            add(self.text_ids("\n"), False)
            sample.answers.append((start, len(ids)))
        sample.input_ids, sample.labels = ids, labels
        sample.pixel_values = torch.cat(tiles) if tiles else None
        return sample

    def tile(self, path: Path, location: str) -> torch.Tensor:
        """InternVL2.5's tiles of an input image: [tiles, 3, 448, 448]."""
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            return self.image_processor([rgb], return_tensors="pt")["pixel_values"]
        except Exception as error:  # noqa: BLE001 - any decoding failure makes the record unusable
            raise RecordError(
                location, f"input image {path} cannot be read: {type(error).__name__}: {error}."
            ) from error


def unconditional_sample(sample: Sample, imgpad_token_id: int, rng: random.Random) -> Sample:
    """
    The classifier-free-guidance variant of a sample, as `generate` builds its unconditional rows: pick an answer
    that draws an image; every token before that answer (system, question, input images, earlier turns) becomes
    `<imgpad>`, the answer itself is kept, the rest is cut. Only the answer's image tokens (codes, `<imgend>`) are
    trained; the input images are gone with their `<IMG_CONTEXT>` tokens.
    """
    answer_index = rng.choice(sorted({answer for _, _, answer in sample.targets}))
    start, end = sample.answers[answer_index]
    ids = [imgpad_token_id] * start + sample.input_ids[start:end]
    labels = [IGNORE_INDEX] * end
    targets = [t for t in sample.targets if t[2] == answer_index]
    for first, last, _ in targets:
        labels[first + 1 : last + 1] = sample.labels[first + 1 : last + 1]
    return Sample(ids, labels, None, [(start, end)], [(f, la, 0) for f, la, _ in targets], [])


def truncate(sample: Sample, max_length: int) -> Sample:
    """Cut a sample to `max_length` tokens without splitting an image: a cut inside one moves to before it."""
    if len(sample.input_ids) <= max_length:
        return sample
    cut = max_length
    for first, last, _ in sample.targets:
        if first < cut <= last:
            cut = first
    for first, last, _, _ in sample.inputs:
        if first < cut <= last:
            cut = first
    inputs = [span for span in sample.inputs if span[1] < cut]
    tiles = sum(count for *_, count in inputs)
    pixel_values = sample.pixel_values[:tiles] if sample.pixel_values is not None and tiles else None
    return Sample(
        sample.input_ids[:cut],
        sample.labels[:cut],
        pixel_values,
        [(s, min(e, cut)) for s, e in sample.answers if s < cut],
        [t for t in sample.targets if t[1] < cut],
        inputs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Dataset and collator
# ---------------------------------------------------------------------------------------------------------------------


class WoHGDataset(torch.utils.data.Dataset):
    """
    Training samples of WoHG: records read and checked once at construction, target codes from the cache, input
    images tiled per item. `cfg_drop_prob`: chance that a sample with a target image is replaced by its unconditional
    variant (decided from `seed`, the epoch and the index, so a resumed run makes the same choices).
    """

    def __init__(
        self,
        sources: list[str | os.PathLike],
        processor: ArmorProcessor,
        model: str,
        image_size: int,
        num_codes: int,
        cfg_drop_prob: float = 0.0,
        max_length: int | None = None,
        max_tiles: int | None = None,
        system_message: str | None = None,
        skip_bad_records: bool = False,
        check_images: bool = True,
        seed: int = 0,
    ):
        self.sources = [Path(source) for source in sources]
        self.encoder = ConversationEncoder(processor, system_message, max_tiles)
        self.imgpad_token_id = processor.imgpad_token_id
        self.cfg_drop_prob, self.max_length, self.seed, self.epoch = cfg_drop_prob, max_length, seed, 0
        self.skip_bad_records = skip_bad_records
        conversations, self.skipped = read_conversations(self.sources, skip_bad_records, check_images)
        self.caches = []
        if any(c.images(True) for c in conversations):
            fingerprint = vqgan_fingerprint(vqgan_folder_of(model))
            try:
                self.caches = [
                    ImageCodeCache(cache_dir_for(s), fingerprint, image_size, num_codes) for s in self.sources
                ]
            except InconsistentCacheError as error:
                raise InconsistentCacheError(f"{error}\n    {tokenize_command(self.sources, model)}") from None
            bad = {id(c): (c, p, why) for c, p, why in check_cache(conversations, self.caches, model, self.sources)}
            for conversation, path, why in bad.values():
                error = RecordError(
                    conversation.location,
                    f"target image {path} cannot be read: {why} (found by tokenize; fix it and run tokenize again).",
                )
                if not skip_bad_records:
                    raise error
                self.skipped.append(str(error))
            conversations = [c for c in conversations if id(c) not in bad]
        if not conversations:
            raise ValueError(f"No usable records in {[str(s) for s in self.sources]} ({len(self.skipped)} skipped).")
        self.conversations = conversations
        # Records that fail only while loading (an input image unreadable by then, no answer within max_length):
        # flags in shared memory, so that those met in DataLoader worker processes are counted too.
        self.skipped_at_start = len(self.skipped)
        self.skipped_while_loading = torch.zeros(len(conversations), dtype=torch.bool).share_memory_()

    def skip_while_loading(self, index: int, error: RecordError):
        """Leave out a record that failed while loading: logged, and counted once however often it is met."""
        logger.warning("skipped while loading: %s", error)
        self.skipped_while_loading[index] = True  # shared with every DataLoader worker: `skipped_count`
        if str(error) not in self.skipped[self.skipped_at_start :]:
            self.skipped.append(str(error))  # the messages of this process only

    def skipped_count(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
        """
        Records left out: at construction and while loading, in this process or any DataLoader worker. `reduce`
        sums the int flags over ranks (distributed training: each rank loads only its share of the records).
        """
        flags = self.skipped_while_loading.int()
        return self.skipped_at_start + int(((reduce(flags) if reduce else flags) > 0).sum())

    def __len__(self) -> int:
        return len(self.conversations)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def kinds(self) -> Counter:
        return Counter(conversation.kind for conversation in self.conversations)

    def sample(self, index: int) -> Sample:
        conversation = self.conversations[index]
        sample = self.encoder.encode(conversation, self.caches[conversation.source].codes if self.caches else None)
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        if sample.targets and self.cfg_drop_prob > 0 and rng.random() < self.cfg_drop_prob:
            sample = unconditional_sample(sample, self.imgpad_token_id, rng)
        if self.max_length is not None and len(sample.input_ids) > self.max_length:
            sample = truncate(sample, self.max_length)
            if all(label == IGNORE_INDEX for label in sample.labels):
                raise RecordError(conversation.location, f"has no answer token within max_length={self.max_length}.")
        return sample

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self)):
            try:
                sample = self.sample((index + attempt) % len(self))
            except RecordError as error:
                if not self.skip_bad_records:
                    raise
                self.skip_while_loading((index + attempt) % len(self), error)
                continue
            return {
                "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
                "labels": torch.tensor(sample.labels, dtype=torch.long),
                "pixel_values": sample.pixel_values,
            }
        raise RuntimeError("No record of the dataset could be loaded.")


@dataclass
class WoHGCollator:
    """
    Right-pads a batch (attention 0, label -100) and concatenates the input tiles in row order, which is the order in
    which the model fills the `<IMG_CONTEXT>` positions. `dummy_image` (ZeRO-3 / FSDP): a batch without input images
    gets one blank tile behind the padding of its first row, so that every rank runs the vision tower (a sharded
    module must run on all ranks); it sits after the real tokens, with attention and labels off, so it changes nothing.
    """

    pad_token_id: int
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    image_seq_length: int
    pad_to_multiple_of: int | None = 8
    dummy_image: bool = False
    tile_size: int = 448

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in items)
        tiles = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
        dummy = self.dummy_image and not tiles
        if dummy:
            length += self.image_seq_length + 2
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            labels[row, :size] = item["labels"]
            attention_mask[row, :size] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "use_cache": False}
        if dummy:
            block = (
                [self.image_start_token_id] + [self.image_token_id] * self.image_seq_length + [self.image_end_token_id]
            )
            input_ids[0, length - len(block) :] = torch.tensor(block)
            tiles = [torch.zeros(1, 3, self.tile_size, self.tile_size)]
        if tiles:
            batch["pixel_values"] = torch.cat(tiles)
        return batch


def build_collator(processor: ArmorProcessor, dummy_image: bool = False) -> WoHGCollator:
    pad = processor.tokenizer.pad_token_id
    return WoHGCollator(
        pad_token_id=pad if pad is not None else 0,
        image_token_id=processor.image_token_id,
        image_start_token_id=processor.image_start_token_id,
        image_end_token_id=processor.image_end_token_id,
        image_seq_length=processor.image_seq_length,
        dummy_image=dummy_image,
        tile_size=processor.image_processor.size["height"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tokenize = commands.add_parser("tokenize", help="Encode every target image once through the VQGAN into the cache.")
    check = commands.add_parser("check", help="Read and check the data and its cache; print what it holds.")
    for command in (tokenize, check):
        command.add_argument("--data", nargs="+", required=True, help=".jsonl files or folders of them")
        command.add_argument("--model", required=True, help="ARMOR checkpoint (its VQGAN and image size are used)")
        command.add_argument("--skip-bad-records", action="store_true", help="leave bad records out and count them")
    tokenize.add_argument("--batch-size", type=int, default=32)
    tokenize.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    tokenize.add_argument("--num-workers", type=int, default=4, help="image decoding and resizing processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources = [Path(source) for source in args.data]
    if args.command == "tokenize":
        summary = tokenize_images(
            sources, args.model, args.batch_size, args.device, args.num_workers, args.skip_bad_records
        )
        print(json.dumps(summary))
        return 0
    from armor.configuration_armor import ArmorConfig

    config = ArmorConfig.from_pretrained(args.model)
    processor = ArmorProcessor.from_pretrained(args.model)
    dataset = WoHGDataset(
        sources,
        processor,
        args.model,
        config.generated_image_size,
        config.num_image_codes,
        skip_bad_records=args.skip_bad_records,
    )
    lengths = []
    for index in range(len(dataset)):
        try:
            lengths.append(len(dataset.sample(index).input_ids))
        except RecordError as error:
            if not args.skip_bad_records:
                raise
            dataset.skip_while_loading(index, error)
    kinds = ", ".join(f"{kind}: {dataset.kinds().get(kind, 0)}" for kind in KINDS)
    print(f"{len(dataset)} records ({kinds}); {dataset.skipped_count()} skipped")
    if lengths:
        print(f"tokens per record: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
