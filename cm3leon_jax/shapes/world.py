"""The built-in shapes world: flat-coloured shapes on a flat background, one per cell of a
3x3 grid, never touching; scenes, their captions and their pixels.

Scene i depends only on (seed, i), so a dataset of any size and resolution needs no files,
and a scene's objects are its exact ground truth: the detector and the scores read
generated images back in these terms. The `shapes` data source (data/sources.py), the image
tokenizer's training images, the SFT suite and the demo all draw from here.

Named scenes are the world's long tail: `names` made-up words, each standing for objects
drawn once (shapes, colours, sizes, cells), scene i showing one of them — placed anew in
their cells — with Zipf-distributed frequency, captioned by its name only ("a binela"). A caption then says nothing a model can compose; what a rare name looks
like is in the few training scenes that show it, which is what retrieval is for (RA-CM3's
argument). The table depends on nothing but the name's rank, so every seed and split of a
source shares it, and `describe` turns a name back into what it shows for scoring.
"""

from __future__ import annotations

import functools

import numpy as np

COLOURS = {  # far apart in RGB and from the background, so a pixel can be told by colour
    "red": (230, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "magenta": (210, 50, 210),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = (("top left", "top middle", "top right"),
             ("middle left", "center", "middle right"),
             ("bottom left", "bottom middle", "bottom right"))
BACKGROUND = (235, 235, 235)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE_FRACTION = {"small": 0.5, "large": 0.95}  # of the free width of a grid cell
MIN_RESOLUTION = 24


def check_world(resolution: int, max_objects: int, who: str = "shapes") -> None:
    """What the world can draw: at least MIN_RESOLUTION pixels, 1..9 objects (one a cell)."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"{who}: resolution={resolution} must be >= {MIN_RESOLUTION}")
    if not 1 <= max_objects <= 9:
        raise ValueError(f"{who}: max_objects={max_objects} must be in [1, 9]")


def shape_mask(shape: str, cx: float, cy: float, half: float, resolution: int) -> np.ndarray:
    """bool [R, R]: pixels whose centres lie inside the shape (no anti-aliasing)."""
    y, x = np.mgrid[:resolution, :resolution] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":  # a plus sign with arms a third of the box wide
        arm = half / 3
        return (((np.abs(dx) <= half) & (np.abs(dy) <= arm))
                | ((np.abs(dy) <= half) & (np.abs(dx) <= arm)))
    raise ValueError(f"unknown shape {shape!r}")


def shapes_scene(index: int, seed: int, resolution: int, max_objects: int) -> list[dict]:
    """The objects of scene `index` (no pixels): cheap, for captions and ground truth."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(1, max_objects + 1))
    cells = sorted(rng.choice(9, size=count, replace=False).tolist())
    objects = []
    for c in cells:
        row, col = divmod(c, 3)
        size = SIZES[int(rng.integers(len(SIZES)))]
        centre, half = _place(row, col, size, rng, resolution)
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        objects.append({"shape": SHAPES[int(rng.integers(len(SHAPES)))], "colour": colour,
                        "rgb": list(COLOURS[colour]), "size": size,
                        "position": POSITIONS[row][col], "cell": [row, col],
                        "center": centre, "half": half})
    return objects


def _place(row: int, col: int, size: str, rng: np.random.Generator,
           resolution: int) -> tuple[list[float], float]:
    """(centre, half width) of an object of `size` in cell (row, col), jittered within it."""
    cell = resolution / 3
    margin = max(1.0, 0.05 * cell)  # >= 2 px between objects in neighbouring cells
    free = cell - 2 * margin
    diameter = SIZE_FRACTION[size] * free
    slack = (free - diameter) / 2
    cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
    return [round(cx, 3), round(cy, 3)], round(diameter / 2, 3)


def shapes_caption(objects: list[dict]) -> str:
    """`two shapes: a small red circle at the top left and a large blue cross at the center`."""
    n = len(objects)
    parts = [f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}" for o in objects]
    listing = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS[n]} shape{'s' if n > 1 else ''}: {listing}"


def draw(objects: list[dict], resolution: int) -> np.ndarray:
    """uint8 [R, R, 3] image of a scene; each object gains its pixel `bbox`."""
    image, boxes = render_shapes(objects, resolution)
    for o, box in zip(objects, boxes):
        o["bbox"] = box
    return image


def render_shapes(objects: list[dict], resolution: int) -> tuple[np.ndarray, list[list[int]]]:
    """uint8 [R, R, 3] image and each object's pixel bbox [x0, y0, x1, y1) (end exclusive)."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = BACKGROUND
    boxes = []
    for o in objects:
        mask = shape_mask(o["shape"], *o["center"], o["half"], resolution)
        image[mask] = o["rgb"]
        ys, xs = np.nonzero(mask)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return image, boxes


NAME_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables
NAMES_SEED = 20240101  # the named table's own seed: the same names for every source seed


def entity_name(rank: int) -> str:
    """The made-up word of the name of rank `rank`: three syllables (a fourth past 70^3),
    scrambled so that neighbouring ranks do not share a stem; distinct for every rank."""
    n = len(NAME_SYLLABLES)
    code = (rank * 7919 + 12345) % n ** 3 if rank < n ** 3 else rank  # a bijection of 0..n^3-1
    digits = []
    while code or len(digits) < 3:
        digits.append(code % n)
        code //= n
    return "".join(NAME_SYLLABLES[d] for d in reversed(digits))


def entity_objects(rank: int, resolution: int, max_objects: int) -> list[dict]:
    """What the name of rank `rank` always shows: its objects' shapes, colours, sizes and
    cells (their jitter within the cell is each scene's own)."""
    return shapes_scene(rank, NAMES_SEED, resolution, max_objects)


def named_objects(rank: int, index: int, seed: int, resolution: int,
                  max_objects: int, jitter: bool = True) -> list[dict]:
    """Scene `index`'s picture of the name of rank `rank`: its objects placed anew in their
    cells, or (`jitter` false) where the name always has them, the same pixels every time."""
    rng = np.random.default_rng([seed, index, 2] if jitter else [NAMES_SEED, rank, 2])
    objects = entity_objects(rank, resolution, max_objects)
    for o in objects:
        o["center"], o["half"] = _place(*o["cell"], o["size"], rng, resolution)
    return objects


@functools.lru_cache(maxsize=8)
def zipf_weights(names: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, names + 1) ** exponent
    return w / w.sum()


def named_scene(index: int, seed: int, names: int, exponent: float) -> int:
    """The rank of the name scene `index` shows: Zipf-distributed over `names` ranks."""
    rng = np.random.default_rng([seed, index, 1])
    return int(rng.choice(names, p=zipf_weights(names, exponent)))


def named_caption(rank: int) -> str:
    return f"a {entity_name(rank)}"


def describe(caption: str, names: int, resolution: int, max_objects: int) -> str:
    """The descriptive caption of what a named caption's name shows (`caption` itself when it
    names none of the `names` ranks): what the detector and caption scores read."""
    words = caption.strip().split()
    if len(words) == 2 and words[0] == "a":
        rank = _ranks(names).get(words[1])
        if rank is not None:
            return shapes_caption(entity_objects(rank, resolution, max_objects))
    return caption


_RANK_CACHE: dict = {}


def _ranks(names: int) -> dict:
    if names not in _RANK_CACHE:
        _RANK_CACHE[names] = {entity_name(r): r for r in range(names)}
    return _RANK_CACHE[names]
