"""Image–caption sources: random-access sequences of `Pair(id, image, caption, meta)`.

Every source is a plain sequence (`len(src)`, `src[i]`), so it is a grain data source and
prepare workers can split it by index. `image` is uint8 [H, W, 3]; `caption` a str; `meta`
a JSON-serialisable dict (the ground truth where the source has one). A record that cannot
be read raises `BadRecord` with a reason from `REASONS` and the record id, so prepare can
count it, log it and go on; nothing is dropped silently.

`shapes` is procedural: scene i depends only on (seed, i), so a dataset of any size and
resolution needs no files, and its `meta` lets later stages score generated images from
pixels (flat colours on a flat background, objects one per cell of a 3x3 grid, never
touching).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

# Why a record was skipped (manifest.json `skipped` keys).
REASONS = ("missing_file", "corrupt_image", "wrong_mode", "wrong_shape", "empty_caption",
           "bad_utf8", "bad_line")


class Pair(NamedTuple):
    id: str
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    meta: dict  # JSON-serialisable ground truth ({} when the source has none)


class BadRecord(Exception):
    """A record that cannot become a document: `reason` is one of REASONS."""

    def __init__(self, reason: str, record_id: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"record {record_id}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.record_id, self.detail = reason, record_id, detail


# --- shapes --------------------------------------------------------------------------

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
    cell = resolution / 3
    margin = max(1.0, 0.05 * cell)  # >= 2 px between objects in neighbouring cells
    free = cell - 2 * margin
    objects = []
    for c in cells:
        row, col = divmod(c, 3)
        size = SIZES[int(rng.integers(len(SIZES)))]
        diameter = SIZE_FRACTION[size] * free
        slack = (free - diameter) / 2
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        objects.append({"shape": SHAPES[int(rng.integers(len(SHAPES)))], "colour": colour,
                        "rgb": list(COLOURS[colour]), "size": size,
                        "position": POSITIONS[row][col], "cell": [row, col],
                        "center": [round(cx, 3), round(cy, 3)],
                        "half": round(diameter / 2, 3)})
    return objects


def shapes_caption(objects: list[dict]) -> str:
    """`two shapes: a small red circle at the top left and a large blue cross at the center`."""
    n = len(objects)
    parts = [f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}" for o in objects]
    listing = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS[n]} shape{'s' if n > 1 else ''}: {listing}"


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


@dataclasses.dataclass(frozen=True)
class ShapesSource:
    """`size` procedural scenes of 1..max_objects coloured shapes at `resolution` pixels."""

    size: int
    resolution: int = 64
    seed: int = 0
    max_objects: int = 3

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"shapes: size={self.size} must be >= 1")
        if self.resolution < MIN_RESOLUTION:
            raise ValueError(f"shapes: resolution={self.resolution} must be >= {MIN_RESOLUTION}")
        if not 1 <= self.max_objects <= 9:
            raise ValueError(f"shapes: max_objects={self.max_objects} must be in [1, 9]")

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"shapes: index {index} outside [0, {self.size})")
        return index

    def caption(self, index: int) -> str:
        index = self._check(index)
        return shapes_caption(shapes_scene(index, self.seed, self.resolution, self.max_objects))

    def __getitem__(self, index: int) -> Pair:
        index = self._check(index)
        objects = shapes_scene(index, self.seed, self.resolution, self.max_objects)
        image, boxes = render_shapes(objects, self.resolution)
        for o, box in zip(objects, boxes):
            o["bbox"] = box
        meta: dict[str, Any] = {"source": "shapes", "resolution": self.resolution,
                                "background": list(BACKGROUND), "count": len(objects),
                                "objects": objects}
        return Pair(f"shapes-{self.seed}-{index}", image, shapes_caption(objects), meta)
