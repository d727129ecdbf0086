"""Shape-world text of every kind of the paper, as WoHG conversation records, and the world's tokenizer.

Kinds (what goes in, what comes out; `wohg_data.Conversation.kind` computes the same from a record):

* ti2t  - an image and a question, a short exact answer ("blue", "2", "top left", "yes", or the scene description);
* t2t   - questions about the world that need no image ("How many corners does a triangle have?" -> "3");
* t2i   - a drawing prompt ("Draw a red circle to the left of a blue square."), the answer is the image alone;
* t2ti  - "What does ... look like? Show me." -> the scene's description and the image;
* ti2ti - an image and an edit ("Make the red circle blue. Show me the result.") -> the new description and image.

Records use the paper's (InternVL) layout that `wohg_data.py` reads, plus a `meta` key that the trainer ignores and
the evaluation reads:

    {"id": "train-t2i-000003",
     "conversations": [{"from": "human", "value": "Draw a red circle to the left of a blue square."},
                       {"from": "gpt", "value": "<image>"}],
     "image": ["images/train-t2i-000003-0.png"],
     "meta": {"kind": "t2i", "split": "train", "task": "relation", "modality": "image", "answer": null,
              "spec": {"objects": [...], "relations": [...], "exact": true}, "scenes": [...],
              "image_roles": ["target"], "heldout_combinations": []}}

`answer` is the exact expected text (for t2ti / ti2ti, the sentence before the image), `spec` what the drawn image
must show (scored by `shapeworld.checker.score`), `scenes` the scene of each image, in the order of `image`.

Answers are short and canonical (lower case, no full stop) so that understanding is scored by exact match;
descriptions are full sentences. Held-out colour-shape combinations never appear, in images or in text, outside the
"heldout" split.
"""

import json
import multiprocessing
import os
import random
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .world import (
    BACKGROUND_NAME,
    CANVAS_SIZE,
    COLOURS,
    HELD_OUT_COMBINATIONS,
    INVERSE_RELATIONS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    allowed_combinations,
    check_split,
    describe,
    join_phrases,
    layout,
    noun_phrase,
    plural,
    relation_holds,
    relations_between,
    render,
    sample_scene,
    scene_split,
)

IMAGE_PLACEHOLDER = "<image>"  # InternVL's placeholder (processing_armor.IMAGE_PLACEHOLDER)
KINDS = ("ti2t", "t2t", "t2i", "t2ti", "ti2ti")
MODALITIES = {"ti2t": "text", "t2t": "text", "t2i": "image", "t2ti": "text+image", "ti2ti": "text+image"}
RECORDS_FILE = "records.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_FOLDER = "images"
MAX_TRIES = 10_000

DRAW_TEMPLATES = ("Draw {}.", "Paint {}.", "Create an image of {}.", "Make a picture of {}.")
SHOW_TEMPLATES = (
    "What {verb} {phrase} look like? Show me.",
    "Show me {phrase} and describe it.",
    "Show me {phrase} and tell me about it.",
)
EDIT_SUFFIX = " Show me the result."


@dataclass
class Example:
    """One conversation of the world: the prompt, the answer, the scenes of its images and what eval checks."""

    kind: str
    split: str
    task: str  # the template family, e.g. "colour", "relation", "recolour"
    prompt: str  # the user's text, without the input image's placeholder
    response: str  # the assistant's answer; "<image>" marks an image it draws
    scenes: list[Scene] = field(default_factory=list)  # one per image, in order
    image_roles: list[str] = field(default_factory=list)  # "input" (shown to the model) or "target" (drawn by it)
    answer: str | None = None  # the exact expected text
    spec: dict | None = None  # what a drawn image must show (shapeworld.checker.score)
    mentioned: list[tuple[str, str]] = field(default_factory=list)  # colour-shape pairs named in the text
    id: str = ""

    @property
    def modality(self) -> str:
        return MODALITIES[self.kind]

    @property
    def heldout_combinations(self) -> list[list[str]]:
        """The held-out (colour, shape) pairs this example shows or names; empty outside the "heldout" split."""
        pairs = set(self.mentioned) | {o.combination for s in self.scenes for o in s.objects}
        return [list(p) for p in HELD_OUT_COMBINATIONS if p in pairs]

    @property
    def human_value(self) -> str:
        inputs = sum(role == "input" for role in self.image_roles)
        return (IMAGE_PLACEHOLDER + "\n") * inputs + self.prompt

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            "split": self.split,
            "task": self.task,
            "modality": self.modality,
            "answer": self.answer,
            "spec": self.spec,
            "scenes": [s.to_dict() for s in self.scenes],
            "image_roles": list(self.image_roles),
            "heldout_combinations": self.heldout_combinations,
        }

    def to_record(self, image_paths: list[str]) -> dict:
        """The record in the paper's layout; `image_paths` (relative to the .jsonl) follow `scenes`."""
        if len(image_paths) != len(self.scenes):
            raise ValueError(f"{self.id}: {len(self.scenes)} scenes but {len(image_paths)} image paths.")
        record = {
            "id": self.id,
            "conversations": [
                {"from": "human", "value": self.human_value},
                {"from": "gpt", "value": self.response},
            ],
        }
        if image_paths:
            record["image"] = list(image_paths)
        record["meta"] = self.meta()
        return record


# ---------------------------------------------------------------------------------------------------------------------
# Drawing specs
# ---------------------------------------------------------------------------------------------------------------------


def drawing_spec(
    objects: Iterable[SceneObject],
    with_size: bool,
    with_position: bool,
    relations: list[tuple[SceneObject, str, SceneObject]] = (),
) -> dict:
    """
    What an image drawn for a prompt must show: the objects grouped by the attributes the prompt names (two red
    circles of unnamed size are one entry of count 2), the named relations, and `exact` (nothing else drawn).
    """
    entries: list[dict] = []
    index_of: dict[tuple, int] = {}
    entry_of_object: dict[int, int] = {}
    for o in objects:
        key = (o.shape, o.colour, o.size if with_size else None, o.position if with_position else None)
        if key not in index_of:
            index_of[key] = len(entries)
            entries.append({"shape": key[0], "colour": key[1], "size": key[2], "position": key[3], "count": 0})
        entries[index_of[key]]["count"] += 1
        entry_of_object[id(o)] = index_of[key]
    spec_relations = [
        {"subject": entry_of_object[id(a)], "relation": relation, "object": entry_of_object[id(b)]}
        for a, relation, b in relations
    ]
    return {"objects": entries, "relations": spec_relations, "exact": True}


def scene_spec(scene: Scene) -> dict:
    """The spec of a fully described scene: every object with its size and position."""
    return drawing_spec(scene.sorted().objects, with_size=True, with_position=True)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _unique(scene: Scene, key: Callable[[SceneObject], object]) -> list[SceneObject]:
    """Objects that `key` singles out in the scene (a question may refer to them without ambiguity)."""
    keys = [key(o) for o in scene.objects]
    return [o for o, k in zip(scene.objects, keys) if keys.count(k) == 1]


def _pair_for(rng: random.Random, split: str) -> tuple[str, str]:
    """A (colour, shape) pair for a prompt of `split`: held-out pairs only (and always) in "heldout"."""
    return rng.choice(HELD_OUT_COMBINATIONS) if split == "heldout" else rng.choice(allowed_combinations(split))


def _the(o: SceneObject) -> str:
    return f"the {o.colour} {o.shape}"


def _retry(make: Callable[[], Example | None], what: str) -> Example:
    for _ in range(MAX_TRIES):
        example = make()
        if example is not None:
            return example
    raise RuntimeError(f"Could not make a {what} example in {MAX_TRIES} tries.")


# ---------------------------------------------------------------------------------------------------------------------
# ti2t: questions about an image
# ---------------------------------------------------------------------------------------------------------------------

TI2T_TASKS = ("describe", "colour", "shape", "count", "where", "size", "exists", "relation")


def _ti2t(rng: random.Random, split: str) -> Example | None:
    scene = sample_scene(rng, split)
    task = rng.choice(TI2T_TASKS)
    mentioned: list[tuple[str, str]] = []
    if task == "describe":
        prompt, answer = rng.choice(("Describe the image.", "What is in the picture?")), describe(scene)
    elif task == "colour":
        candidates = _unique(scene, lambda o: o.shape)
        if not candidates:
            return None
        o = rng.choice(candidates)
        prompt, answer = f"What colour is the {o.shape}?", o.colour
    elif task == "shape":
        candidates = _unique(scene, lambda o: o.colour)
        if not candidates:
            return None
        o = rng.choice(candidates)
        prompt, answer = f"What shape is the {o.colour} object?", o.shape
    elif task == "count":
        question = rng.choice(("shape", "colour", "all"))
        if question == "shape":
            shape = rng.choice(SHAPES)
            prompt = f"How many {plural(shape)} are there?"
            answer = str(sum(o.shape == shape for o in scene.objects))
        elif question == "colour":
            colour = rng.choice(tuple(COLOURS))
            prompt = f"How many {colour} objects are there?"
            answer = str(sum(o.colour == colour for o in scene.objects))
        else:
            prompt, answer = "How many objects are there?", str(len(scene.objects))
    elif task in ("where", "size"):
        candidates = _unique(scene, lambda o: o.combination)
        if not candidates:
            return None
        o = rng.choice(candidates)
        if task == "where":
            prompt, answer = f"Where is {_the(o)}?", o.position
        else:
            prompt, answer = f"Is {_the(o)} large or small?", o.size
    elif task == "exists":
        if rng.random() < 0.5:
            colour, shape = rng.choice(scene.objects).combination
        else:
            colour, shape = rng.choice(allowed_combinations(split))
        mentioned.append((colour, shape))
        prompt = f"Is there {noun_phrase(shape, colour)} in the picture?"
        answer = "yes" if any(o.combination == (colour, shape) for o in scene.objects) else "no"
    else:  # relation
        candidates = _unique(scene, lambda o: o.combination)
        if len(candidates) < 2:
            return None
        a, b = rng.sample(candidates, 2)
        relation = rng.choice(RELATIONS)
        prompt = f"Is {_the(a)} {RELATION_PHRASES[relation]} {_the(b)}?"
        answer = "yes" if relation_holds((a.x, a.y), (b.x, b.y), relation) else "no"
    return Example("ti2t", split, task, prompt, answer, [scene], ["input"], answer=answer, mentioned=mentioned)


# ---------------------------------------------------------------------------------------------------------------------
# t2t: questions about the world
# ---------------------------------------------------------------------------------------------------------------------

CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4, "star": 10}
SIDES = {"square": 4, "triangle": 3, "diamond": 4}
MIXES = {("red", "yellow"): "orange", ("red", "blue"): "purple", ("blue", "yellow"): "green"}
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above"}
OPPOSITES.update({"large": "small", "small": "large"})


def world_facts() -> list[tuple[str, str, str]]:
    """(task, question, answer) facts of the world that hold without any image, in a fixed order."""
    facts = []
    for shape, corners in CORNERS.items():
        facts.append(("corners", f"How many corners does {noun_phrase(shape)} have?", str(corners)))
    for shape, sides in SIDES.items():
        facts.append(("sides", f"How many sides does {noun_phrase(shape)} have?", str(sides)))
    facts.append(("points", "How many points does a star have?", "5"))
    for shape in SHAPES:
        facts.append(("round", f"Is {noun_phrase(shape)} round?", "yes" if shape == "circle" else "no"))
    for (a, b), mixed in MIXES.items():
        facts.append(("mix", f"What colour do you get when you mix {a} and {b}?", mixed))
        facts.append(("mix", f"What colour do you get when you mix {b} and {a}?", mixed))
    for word, opposite in OPPOSITES.items():
        facts.append(("opposite", f"What is the opposite of {word}?", opposite))
    facts += [
        ("which", "Which shape has three corners?", "triangle"),
        ("which", "Which shape is round?", "circle"),
        ("which", "Which shape has five points?", "star"),
        ("background", "What colour is the background of the pictures?", BACKGROUND_NAME),
        ("world", "How many shapes are there?", str(len(SHAPES))),
        ("world", "How many colours are there?", str(len(COLOURS))),
        ("world", "How many sizes are there?", str(len(SIZES))),
        ("world", "What shapes are there?", join_phrases(list(SHAPES))),
        ("world", "What colours are there?", join_phrases(list(COLOURS))),
        ("world", "What sizes are there?", join_phrases(list(SIZES))),
        ("world", "Where can a shape be?", join_phrases(list(POSITIONS))),
    ]
    return facts


T2T_TASKS = ("fact", "inverse", "bigger")


def _t2t(rng: random.Random, split: str) -> Example | None:
    task = rng.choice(T2T_TASKS)
    mentioned: list[tuple[str, str]] = []
    if task == "fact":
        task, prompt, answer = rng.choice(world_facts())
    elif task == "inverse":  # relational reasoning over named objects: the held-out pairs appear only in "heldout"
        a = _pair_for(rng, split)
        b = rng.choice(allowed_combinations(split))
        if a == b:
            return None
        mentioned = [a, b]
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        relation = rng.choice(RELATIONS)
        np_first, np_second = noun_phrase(first[1], first[0]), noun_phrase(second[1], second[0])
        the_first, the_second = f"the {first[0]} {first[1]}", f"the {second[0]} {second[1]}"
        premise = f"If {np_first} is {RELATION_PHRASES[relation]} {np_second}"
        if rng.random() < 0.5:
            prompt = f"{premise}, where is {the_second}?"
            answer = f"{RELATION_PHRASES[INVERSE_RELATIONS[relation]]} {the_first}"
        else:
            asked = rng.choice((relation, INVERSE_RELATIONS[relation]))
            prompt = f"{premise}, is {the_second} {RELATION_PHRASES[asked]} {the_first}?"
            answer = "yes" if asked == INVERSE_RELATIONS[relation] else "no"
    else:  # bigger
        shape = rng.choice(SHAPES)
        options = [noun_phrase(shape, size="small"), noun_phrase(shape, size="large")]
        rng.shuffle(options)
        prompt = f"Which is bigger, {options[0]} or {options[1]}?"
        answer = noun_phrase(shape, size="large")
    return Example("t2t", split, task, prompt, answer, answer=answer, mentioned=mentioned)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing requests (t2i and t2ti)
# ---------------------------------------------------------------------------------------------------------------------

DRAW_TASKS = ("object", "object_position", "relation", "count", "scene")


@dataclass
class DrawingRequest:
    task: str
    phrase: str  # what to draw, as a noun phrase: "a red circle to the left of a blue square"
    scene: Scene  # a scene that satisfies it (the training target)
    spec: dict


def drawing_request(rng: random.Random, split: str, task: str | None = None) -> DrawingRequest:
    """A random drawing request of `split` and a scene that satisfies it (same scene split rules as images)."""
    task = task or rng.choice(DRAW_TASKS)
    if task not in DRAW_TASKS:
        raise ValueError(f"Unknown drawing task {task!r}; use one of {', '.join(DRAW_TASKS)}.")
    for _ in range(MAX_TRIES):
        request = _drawing_request(rng, split, task)
        if request is not None and scene_split(request.scene) == split:
            return request
    raise RuntimeError(f"Could not make a {split} drawing request of task {task} in {MAX_TRIES} tries.")


def _drawing_request(rng: random.Random, split: str, task: str) -> DrawingRequest | None:
    if task in ("object", "object_position"):
        colour, shape = _pair_for(rng, split)
        size = rng.choice(tuple(SIZES))
        named_size = rng.random() < 0.5
        scene = layout(rng, [(shape, colour, size)])
        o = scene.objects[0]
        phrase = noun_phrase(shape, colour, size if named_size else None)
        with_position = task == "object_position"
        if with_position:
            phrase += " " + POSITION_PHRASES[o.position]
        return DrawingRequest(task, phrase, scene, drawing_spec([o], named_size, with_position))
    if task == "relation":
        scene = sample_scene(rng, split, num_objects=2)
        a, b = rng.sample(scene.objects, 2)
        if a.combination == b.combination:
            return None  # "a red circle to the left of a red circle" cannot be scored object by object
        relation = rng.choice(relations_between(a, b))
        named_size = rng.random() < 0.3
        phrase = f"{a.noun_phrase(named_size)} {RELATION_PHRASES[relation]} {b.noun_phrase(named_size)}"
        return DrawingRequest(task, phrase, scene, drawing_spec([a, b], named_size, False, [(a, relation, b)]))
    if task == "count":
        colour, shape = _pair_for(rng, split)
        count = rng.randint(2, 4)
        scene = layout(rng, [(shape, colour, rng.choice(tuple(SIZES))) for _ in range(count)]).sorted()
        phrase = noun_phrase(shape, colour, count=count)
        return DrawingRequest(task, phrase, scene, drawing_spec(scene.objects, False, False))
    scene = sample_scene(rng, split, num_objects=rng.randint(2, 4))
    description = describe(scene)
    phrase = description[0].lower() + description[1:-1]
    return DrawingRequest(task, phrase, scene, scene_spec(scene))


def _t2i(rng: random.Random, split: str) -> Example:
    request = drawing_request(rng, split)
    prompt = rng.choice(DRAW_TEMPLATES).format(request.phrase)
    return Example(
        "t2i", split, request.task, prompt, IMAGE_PLACEHOLDER, [request.scene], ["target"], spec=request.spec
    )


def _t2ti(rng: random.Random, split: str) -> Example:
    request = drawing_request(rng, split)
    verb = "do" if request.task == "count" else "does"  # "What do two red circles look like?"
    prompt = rng.choice(SHOW_TEMPLATES).format(verb=verb, phrase=request.phrase)
    sentence = describe(request.scene)
    response = f"{sentence}\n{IMAGE_PLACEHOLDER}"
    return Example(
        "t2ti", split, request.task, prompt, response, [request.scene], ["target"], answer=sentence, spec=request.spec
    )


# ---------------------------------------------------------------------------------------------------------------------
# ti2ti: edit an image, describe and draw the result
# ---------------------------------------------------------------------------------------------------------------------

EDIT_TASKS = ("recolour", "remove", "add", "mirror")


def _ti2ti(rng: random.Random, split: str) -> Example | None:
    task = rng.choice(EDIT_TASKS)
    scene = sample_scene(rng, split if split != "heldout" else rng.choice(("train", "heldout")))
    objects = list(scene.objects)
    mentioned: list[tuple[str, str]] = []
    candidates = _unique(scene, lambda o: o.combination)
    if task in ("recolour", "remove") and not candidates:
        return None
    if task == "recolour":
        o = rng.choice(candidates)
        colour = rng.choice([c for c in COLOURS if c != o.colour])
        objects[objects.index(o)] = SceneObject(o.shape, colour, o.size, o.x, o.y)
        instruction = f"Make {_the(o)} {colour}."
        mentioned = [o.combination]
    elif task == "remove":
        if len(objects) < 2:
            return None
        o = rng.choice(candidates)
        objects.remove(o)
        instruction = f"Remove {_the(o)}."
        mentioned = [o.combination]
    elif task == "add":
        free = [cell for cell in range(len(POSITIONS)) if cell not in {o.cell for o in objects}]
        colour, shape = _pair_for(rng, split)
        size = rng.choice(tuple(SIZES))
        added = layout(rng, [(shape, colour, size)], cells=[rng.choice(free)]).objects[0]
        objects.append(added)
        instruction = f"Add {added.noun_phrase()} {POSITION_PHRASES[added.position]}."
        mentioned = [added.combination]
    else:  # mirror
        objects = [SceneObject(o.shape, o.colour, o.size, CANVAS_SIZE - o.x, o.y) for o in objects]
        instruction = "Flip the picture from left to right."
    result = Scene(tuple(objects)).sorted()
    if scene_split(result) != split or (split != "heldout" and scene_split(scene) != split):
        return None
    sentence = describe(result)
    return Example(
        "ti2ti",
        split,
        task,
        instruction + EDIT_SUFFIX,
        f"{sentence}\n{IMAGE_PLACEHOLDER}",
        [scene, result],
        ["input", "target"],
        answer=sentence,
        spec=scene_spec(result),
        mentioned=mentioned,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------

MAKERS: dict[str, Callable[[random.Random, str], Example | None]] = {
    "ti2t": _ti2t,
    "t2t": _t2t,
    "t2i": _t2i,
    "t2ti": _t2ti,
    "ti2ti": _ti2ti,
}


def make_examples(kind: str, count: int, split: str, seed: int) -> list[Example]:
    """`count` examples of one kind, deterministic for (kind, split, seed); ids are "{split}-{kind}-{index:06d}"."""
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}; use one of {', '.join(KINDS)}.")
    check_split(split)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"The count of {kind} examples must be a non-negative integer, got {count!r}.")
    rng = random.Random(f"shapeworld/{seed}/{split}/{kind}")
    examples = []
    for index in range(count):
        example = _retry(lambda: MAKERS[kind](rng, split), f"{split} {kind}")
        example.id = f"{split}-{kind}-{index:06d}"
        examples.append(example)
    return examples


def split_counts(total: int, parts: int) -> list[int]:
    """`total` cut into `parts` near-equal counts (the first ones one larger)."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def run_jobs(jobs: list[tuple[Callable, tuple]], workers: int) -> list:
    """Run independent jobs in worker processes (fork: the calling script is not re-imported), or inline for one."""
    if workers <= 1 or len(jobs) <= 1:
        return [function(*arguments) for function, arguments in jobs]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(function, *arguments) for function, arguments in jobs]
        return [future.result() for future in futures]


def write_dataset(
    folder: str | os.PathLike,
    counts_per_kind: dict[str, int],
    split: str,
    seed: int,
    image_size: int = 256,
    part: str | None = None,
) -> Path:
    """
    Write `records.jsonl` and `images/*.png` (paths relative to the .jsonl) into `folder`: `counts_per_kind[kind]`
    examples of each kind, in KINDS order. The same arguments give byte-identical files. Returns the .jsonl path.
    With `part`, the records go to `{part}.jsonl` and the images to `images/{part}/`, so that several parts written
    in parallel (with different seeds) share one folder, which the WoHG loader reads as one source.
    """
    unknown = sorted(set(counts_per_kind) - set(KINDS))
    if unknown:
        raise ValueError(f"Unknown kinds {unknown}; counts_per_kind takes {', '.join(KINDS)}.")
    folder = Path(folder)
    records_file = f"{part}.jsonl" if part else RECORDS_FILE
    images_folder = f"{IMAGES_FOLDER}/{part}" if part else IMAGES_FOLDER
    (folder / images_folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for kind in KINDS:
        for example in make_examples(kind, counts_per_kind.get(kind, 0), split, seed):
            paths = []
            for index, scene in enumerate(example.scenes):
                path = f"{images_folder}/{example.id}-{index}.png"
                render(scene, image_size).save(folder / path, format="PNG")
                paths.append(path)
            lines.append(json.dumps(example.to_record(paths), ensure_ascii=False))
    records = folder / records_file
    temporary = folder / (records_file + ".tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(records)
    return records


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a `records.jsonl` (or of the one inside a folder), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

# The tokens a Qwen2 tokenizer of InternVL2.5 has after its byte-level vocabulary, in id order: Qwen's three, then
# the ones InternVL adds.
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
# Qwen2's pre-tokenisation: contractions, words with one leading non-letter, single digits, punctuation, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_MAX_LENGTH = 16384
CHAT_TEXT_COPIES = 16


def byte_alphabet() -> list[str]:
    """The 256 byte symbols of byte-level BPE in GPT-2's order (printable bytes first), which Qwen2's ids 0-255 use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


def world_texts(seed: int = 0, count_per_kind: int = 400) -> list[str]:
    """Text the world's model reads or writes: every split's prompts and answers, the facts, and the chat-template
    words (the InternVL2.5 system message included: it opens every sequence)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import armor_package  # noqa: F401  (registers the package `armor`)
    from armor.processing_armor import INTERNVL2_5_SYSTEM_MESSAGE

    # The chat template's text opens every sequence: repeated, BPE merges it into a few tokens.
    texts = [INTERNVL2_5_SYSTEM_MESSAGE, "system\n", "user\n", "assistant\n"] * CHAT_TEXT_COPIES
    texts += [text for _, question, answer in world_facts() for text in (question, answer)]
    for split in ("train", "test", "heldout"):
        for kind in KINDS:
            for example in make_examples(kind, count_per_kind, split, seed):
                texts.append(example.human_value.replace(IMAGE_PLACEHOLDER + "\n", ""))
                texts.append(example.response.replace("\n" + IMAGE_PLACEHOLDER, ""))
    return texts


def train_tokenizer(texts: list[str], folder: str | os.PathLike, vocab_size: int = 1024) -> int:
    """
    Train a byte-level BPE on `texts` and save it as a Qwen2 tokenizer folder like InternVL2.5's (vocab.json,
    merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json): ids 0-255 the
    bytes, then one id per merge, then ADDED_TOKENS. `vocab_size` bounds the byte-level part; the world's text
    usually runs out of merges first. Returns V = len(tokenizer), the LLM's vocabulary size.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("`texts` must be a non-empty list of strings.")
    if vocab_size < 257:
        raise ValueError(f"`vocab_size` must exceed the 256 byte tokens, got {vocab_size}.")

    def pipeline(tokenizer: Tokenizer) -> Tokenizer:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return tokenizer

    trainer_model = pipeline(Tokenizer(BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, initial_alphabet=byte_alphabet(), show_progress=False
    )
    trainer_model.train_from_iterator(texts, trainer=trainer)
    merges = [tuple(pair) for pair in json.loads(trainer_model.to_str())["model"]["merges"]]
    # Qwen2's id layout: bytes in GPT-2 order, then each merge's result at 256 + its rank.
    vocab = {symbol: index for index, symbol in enumerate(byte_alphabet())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = pipeline(
        Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        )
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    base = len(vocab)
    total = base + len(ADDED_TOKENS)
    if tokenizer.get_vocab_size(with_added_tokens=True) != total:
        raise RuntimeError("The trained vocabulary and the added tokens overlap; this is a bug in train_tokenizer.")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    added = {token: base + i for i, token in enumerate(ADDED_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def token_entry(token: str) -> dict:
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    additional = list(ADDED_TOKENS[1:])
    special_map = {
        "additional_special_tokens": additional,
        "eos_token": token_entry("<|im_end|>"),
        "pad_token": token_entry("<|endoftext|>"),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {**token_entry(t), "special": True} for t, i in added.items()},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return total
