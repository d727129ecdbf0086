"""The shape world: seeded scenes of 1-4 flat-coloured shapes on a white canvas, their images and descriptions.

Everything is chosen so that language names it exactly and a checker recovers it exactly:

* objects sit in the cells of a 3x3 grid (a few pixels of jitter), one per cell, so every object has a position name
  ("top left", "centre", ...) and two objects in different columns (rows) are clearly "left of" ("above") each other;
* neighbouring objects keep a gap of at least 11 px, so colour segments never touch;
* shapes are drawn by Pillow without anti-aliasing, so a clean image holds only the palette's colours;
* every colour is at least 97 RGB units from every other and from the background.

Coordinates are canvas pixels of a 256x256 image (`CANVAS_SIZE`): an object's `x`, `y` is the centre of its bounding
box and `SIZES[size]` its bounding-box side. `render(scene, size)` scales to other image sizes.

Splits. `HELD_OUT_COMBINATIONS` (colour, shape) pairs never occur in "train" or "test" scenes; "heldout" scenes hold at
least one of them. "train" and "test" share the distribution but never a scene: a scene's split is a hash of its
canonical description (`describe`), so one scene in `TEST_SHARE` goes to "test".
"""

import hashlib
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CANVAS_SIZE = 256
BACKGROUND_NAME = "white"
BACKGROUND = (255, 255, 255)
# Far apart in RGB (the closest pair, orange and yellow, is 97 units apart) so that blur and JPEG keep them separable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 30),
    "orange": (240, 130, 0),
    "yellow": (245, 225, 20),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, int] = {"small": 36, "large": 64}  # bounding-box side in canvas pixels
STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star: clearly concave, yet thick enough to draw

GRID = 3
CELL = CANVAS_SIZE / GRID
JITTER = 5  # max offset of an object's centre from its cell's centre, in canvas pixels
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "centre", "right")
# Position names in reading order (cell index = 3 * row + column).
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
INVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# A relation holds when the centres differ by more than this along its axis. Objects in different grid columns
# (rows) are at least 75 px apart, objects in the same column (row) at most 10 px.
RELATION_MARGIN = 24
MIN_GAP = 8  # minimum distance between two objects' bounding boxes (the grid layout guarantees 11)

HELD_OUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("red", "star"),
    ("green", "diamond"),
    ("yellow", "circle"),
    ("blue", "square"),
)
SPLITS = ("train", "test", "heldout")
TEST_SHARE = 10  # one scene in ten (by the hash of its description) belongs to "test"
MAX_OBJECTS = GRID * GRID
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class SceneObject:
    """One flat-coloured shape. `x`, `y`: centre of its bounding box in canvas pixels; `size`: "small" or "large"."""

    shape: str
    colour: str
    size: str
    x: int
    y: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Unknown shape {self.shape!r}; the world's shapes are {', '.join(SHAPES)}.")
        if self.colour not in COLOURS:
            raise ValueError(f"Unknown colour {self.colour!r}; the world's colours are {', '.join(COLOURS)}.")
        if self.size not in SIZES:
            raise ValueError(f"Unknown size {self.size!r}; use {' or '.join(SIZES)}.")
        half = SIZES[self.size] / 2
        for name, value in (("x", self.x), ("y", self.y)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be an integer (canvas pixels), got {value!r}.")
            if value - half < 0 or value + half > CANVAS_SIZE:
                raise ValueError(
                    f"A {self.size} object at {name}={value} leaves the {CANVAS_SIZE}px canvas; keep its centre "
                    f"within [{half:g}, {CANVAS_SIZE - half:g}]."
                )

    @property
    def extent(self) -> int:
        return SIZES[self.size]

    @property
    def position(self) -> str:
        return position_name(self.x, self.y)

    @property
    def cell(self) -> int:
        row, column = cell_of(self.x, self.y)
        return GRID * row + column

    @property
    def combination(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def noun_phrase(self, with_size: bool = True) -> str:
        return noun_phrase(self.shape, self.colour, self.size if with_size else None)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, data: dict) -> "SceneObject":
        missing = [key for key in ("shape", "colour", "size", "x", "y") if key not in data]
        if missing:
            raise ValueError(
                f"A scene object needs shape, colour, size, x and y; {data!r} lacks {', '.join(missing)}."
            )
        return cls(data["shape"], data["colour"], data["size"], data["x"], data["y"])


@dataclass(frozen=True)
class Scene:
    """Objects on the canvas, in any order; they never overlap (checked), which keeps the checker exact."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"A scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}.")
        for i, a in enumerate(self.objects):
            if not isinstance(a, SceneObject):
                raise ValueError(f"Scene objects must be SceneObject instances, got {type(a).__name__}.")
            for b in self.objects[:i]:
                gap = max(abs(a.x - b.x) - (a.extent + b.extent) / 2, abs(a.y - b.y) - (a.extent + b.extent) / 2)
                if gap < MIN_GAP:
                    raise ValueError(
                        f"{a.noun_phrase()} at ({a.x}, {a.y}) and {b.noun_phrase()} at ({b.x}, {b.y}) are {gap:g} px "
                        f"apart; objects must keep a gap of at least {MIN_GAP} px so that they never touch."
                    )

    def sorted(self) -> "Scene":
        """The same scene with its objects in reading order (top row first, left to right)."""
        return Scene(tuple(sorted(self.objects, key=lambda o: (o.cell, o.y, o.x))))

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise ValueError(f"A scene dict is {{'objects': [...]}}, got {data!r}.")
        return cls(tuple(SceneObject.from_dict(o) for o in data["objects"]))


# ---------------------------------------------------------------------------------------------------------------------
# Language
# ---------------------------------------------------------------------------------------------------------------------


def plural(shape: str) -> str:
    return shape + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(shape: str, colour: str | None = None, size: str | None = None, count: int = 1) -> str:
    """ "a large red circle", "an orange star", "two small blue squares": the world's canonical noun phrases."""
    words = " ".join(word for word in (size, colour) if word)
    if count == 1:
        return with_article(f"{words} {shape}" if words else shape)
    return f"{NUMBER_WORDS[count]} {words} {plural(shape)}" if words else f"{NUMBER_WORDS[count]} {plural(shape)}"


def join_phrases(phrases: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(scene: Scene) -> str:
    """The canonical description: every object with its size, colour, shape and position, in reading order."""
    phrases = [f"{o.noun_phrase()} {POSITION_PHRASES[o.position]}" for o in scene.sorted().objects]
    text = join_phrases(phrases)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


def cell_of(x: float, y: float) -> tuple[int, int]:
    """(row, column) of the 3x3 grid cell holding canvas point (x, y)."""
    column = min(GRID - 1, max(0, int(x // CELL)))
    row = min(GRID - 1, max(0, int(y // CELL)))
    return row, column


def position_name(x: float, y: float) -> str:
    row, column = cell_of(x, y)
    return POSITIONS[GRID * row + column]


def cell_centre(cell: int) -> tuple[float, float]:
    row, column = divmod(cell, GRID)
    return (column + 0.5) * CELL, (row + 0.5) * CELL


def relation_holds(subject_xy: tuple[float, float], object_xy: tuple[float, float], relation: str) -> bool:
    """Whether `subject` is `relation` `object` ("left of", "right of", "above", "below") with a clear margin."""
    dx = subject_xy[0] - object_xy[0]
    dy = subject_xy[1] - object_xy[1]
    if relation == "left of":
        return dx < -RELATION_MARGIN
    if relation == "right of":
        return dx > RELATION_MARGIN
    if relation == "above":
        return dy < -RELATION_MARGIN
    if relation == "below":
        return dy > RELATION_MARGIN
    raise ValueError(f"Unknown relation {relation!r}; use one of {', '.join(RELATIONS)}.")


def relations_between(a: SceneObject, b: SceneObject) -> list[str]:
    """The relations that hold from `a` to `b` (zero, one or two of them)."""
    return [r for r in RELATIONS if relation_holds((a.x, a.y), (b.x, b.y), r)]


# ---------------------------------------------------------------------------------------------------------------------
# Splits and sampling
# ---------------------------------------------------------------------------------------------------------------------


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT_COMBINATIONS


def allowed_combinations(split: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs a scene of `split` may use freely: all but the held-out ones, or all for "heldout"."""
    check_split(split)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return pairs if split == "heldout" else [p for p in pairs if p not in HELD_OUT_COMBINATIONS]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")


def scene_split(scene: Scene) -> str:
    """ "heldout" if any object is a held-out combination, else "test" for one scene in TEST_SHARE, else "train"."""
    if any(is_held_out(o.colour, o.shape) for o in scene.objects):
        return "heldout"
    digest = hashlib.sha256(describe(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_SHARE == 0 else "train"


def layout(rng: random.Random, attributes: list[tuple[str, str, str]], cells: list[int] | None = None) -> Scene:
    """Place (shape, colour, size) objects in distinct grid cells (random unless given), jittered by up to JITTER."""
    if cells is None:
        cells = rng.sample(range(MAX_OBJECTS), len(attributes))
    if len(cells) != len(attributes) or len(set(cells)) != len(cells):
        raise ValueError(f"Give one distinct cell per object: {len(attributes)} objects, cells {cells}.")
    objects = []
    for (shape, colour, size), cell in zip(attributes, cells):
        cx, cy = cell_centre(cell)
        x = round(cx) + rng.randint(-JITTER, JITTER)
        y = round(cy) + rng.randint(-JITTER, JITTER)
        objects.append(SceneObject(shape, colour, size, x, y))
    return Scene(tuple(objects))


def sample_scene(
    rng: random.Random,
    split: str = "train",
    num_objects: int | None = None,
    max_objects: int = 4,
    max_tries: int = 10_000,
) -> Scene:
    """
    A random scene of `split`, objects in reading order. `num_objects` fixes the count, otherwise it is uniform in
    [1, max_objects]. "heldout" scenes get one held-out combination at a random place; the other objects are free.
    """
    check_split(split)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"`max_objects` must be in [1, {MAX_OBJECTS}], got {max_objects}.")
    if num_objects is not None and not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"`num_objects` must be in [1, {MAX_OBJECTS}], got {num_objects}.")
    pairs = allowed_combinations(split)
    for _ in range(max_tries):
        count = num_objects if num_objects is not None else rng.randint(1, max_objects)
        chosen = [rng.choice(pairs) for _ in range(count)]
        if split == "heldout":
            chosen[rng.randrange(count)] = rng.choice(HELD_OUT_COMBINATIONS)
        attributes = [(shape, colour, rng.choice(tuple(SIZES))) for colour, shape in chosen]
        scene = layout(rng, attributes).sorted()
        if scene_split(scene) == split:
            return scene
    raise RuntimeError(f"No {split} scene found in {max_tries} tries; relax the constraints.")


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------


def shape_polygon(shape: str, x: float, y: float, extent: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape whose bounding box is `extent` wide, centred on (x, y)."""
    half = extent / 2
    if shape == "square":
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape == "triangle":  # apex up, base down: its centroid at 2/3 of its height tells it from a diamond
        return [(x, y - half), (x + half, y + half), (x - half, y + half)]
    if shape == "diamond":
        return [(x, y - half), (x + half, y), (x, y + half), (x - half, y)]
    if shape == "star":  # five points, the top one up, its outer radius half the extent
        outer = half
        inner = outer * STAR_INNER_RATIO
        # The lower points sit at outer * cos(36 deg) below the star's centre, the top one at outer above it: shift
        # down so that (x, y) is the centre of its bounding box, as for every other shape.
        shift = outer * (1 - math.cos(math.pi / 5)) / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = math.pi * k / 5 - math.pi / 2
            points.append((x + radius * math.cos(angle), y + shift + radius * math.sin(angle)))
        return points
    raise ValueError(f"{shape!r} is not a polygonal shape.")


def render(scene: Scene, size: int = CANVAS_SIZE) -> Image.Image:
    """The scene as a `size` x `size` RGB image: flat colours on white, no anti-aliasing (only palette colours)."""
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"`size` must be an integer of at least 32 pixels, got {size!r}.")
    scale = size / CANVAS_SIZE
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x, y, extent, colour = o.x * scale, o.y * scale, o.extent * scale, COLOURS[o.colour]
        if o.shape == "circle":
            half = extent / 2
            draw.ellipse([x - half, y - half, x + half - 1, y + half - 1], fill=colour)
        elif o.shape == "square":
            half = extent / 2
            draw.rectangle([x - half, y - half, x + half - 1, y + half - 1], fill=colour)
        else:
            draw.polygon(shape_polygon(o.shape, x, y, extent), fill=colour)
    return image
