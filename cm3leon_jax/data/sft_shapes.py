"""The synthetic SFT suite from the `shapes` scenes: five tasks, exact answers, no download.

Every example is a pure function of (seed, task, split, index): its scene comes from
`sources.shapes_scene` and is drawn with `sources.render_shapes` (the `shapes` generator's
public functions, unchanged), so the ground truth in `meta` lets evaluation score answers
and generated pixels exactly.

- caption: the scene's `shapes` caption.
- vqa: colour ("What colour is the circle?"), count ("How many red shapes are there?") and
  position ("Where is the square?") questions, answers exact words.
- edit: the same scene before and after one edit, which changes exactly the asked attribute:
  recolour ("make the circle red") or move one cell ("move the square left").
- grounding: the caption without positions and each object's pixel box.
- control: an edge or segmentation map of the scene -> the scene.

Splits: train example i uses scene stream index `i * len(TASKS) + task`; eval example i the
same from `EVAL_OFFSET` on, so held-out scenes are never training scenes (by index).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cm3leon_jax.data.sft_tasks import PHRASINGS, TASKS, SFTExample, format_example
from cm3leon_jax.data.sources import (COLOURS, MIN_RESOLUTION, NUMBERS, POSITIONS, SHAPES,
                                      render_shapes, shape_mask, shapes_caption, shapes_scene)

SPLITS = ("train", "eval")
EVAL_OFFSET = 2**40  # eval scenes start here in the scene stream
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
CONDITIONS = ("edge", "segmentation")
SEGMENT_COLOURS = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255),
                   "cross": (255, 255, 0)}  # segmentation map: one colour per shape class
VQA_KINDS = ("colour", "count", "position")


# --- pure scene functions ------------------------------------------------------------

def reference(objects: list[dict], i: int, positional: bool = True,
              coloured: bool = True) -> str | None:
    """The shortest unambiguous name of object i: `the circle`, `the red circle` (unless
    `coloured` is False) or `the circle at the top left` (unless `positional` is False;
    None when no allowed name tells it apart). A question never names its own answer."""
    o = objects[i]
    if sum(p["shape"] == o["shape"] for p in objects) == 1:
        return f"the {o['shape']}"
    if coloured and sum(p["shape"] == o["shape"] and p["colour"] == o["colour"]
                        for p in objects) == 1:
        return f"the {o['colour']} {o['shape']}"
    return f"the {o['shape']} at the {o['position']}" if positional else None


def recolour(objects: list[dict], i: int, colour: str) -> list[dict]:
    """The scene with object i painted `colour`; everything else unchanged."""
    out = [dict(o) for o in objects]
    out[i].update(colour=colour, rgb=list(COLOURS[colour]))
    return out


def move(objects: list[dict], i: int, direction: str, resolution: int) -> list[dict]:
    """The scene with object i moved one grid cell: shifted by round(R / 3) pixels, so its
    pixels are an exact translate (the 2-pixel gap between cells absorbs the rounding)."""
    dr, dc = DIRECTIONS[direction]
    out = [dict(o) for o in objects]
    o = out[i]
    row, col = o["cell"][0] + dr, o["cell"][1] + dc
    if not (0 <= row < 3 and 0 <= col < 3) or any(p["cell"] == [row, col] for p in out):
        raise ValueError(f"cannot move object {i} {direction}: cell {[row, col]} is "
                         "outside the grid or taken")
    step = round(resolution / 3)  # whole pixels, so the moved object is an exact translate
    o.update(cell=[row, col], position=POSITIONS[row][col],
             center=[round(o["center"][0] + dc * step, 3), round(o["center"][1] + dr * step, 3)])
    return out


def segmentation_map(objects: list[dict], resolution: int) -> np.ndarray:
    """uint8 [R, R, 3]: each object's pixels in its shape class colour on black."""
    out = np.zeros((resolution, resolution, 3), np.uint8)
    for o in objects:
        out[shape_mask(o["shape"], *o["center"], o["half"], resolution)] = SEGMENT_COLOURS[o["shape"]]
    return out


def edge_map(image: np.ndarray) -> np.ndarray:
    """uint8 [R, R, 3]: black where a pixel differs from its right or lower neighbour, else white."""
    diff = np.zeros(image.shape[:2], bool)
    diff[:, :-1] |= (image[:, :-1] != image[:, 1:]).any(-1)
    diff[:-1, :] |= (image[:-1, :] != image[1:, :]).any(-1)
    return np.where(diff[..., None], 0, 255).astype(np.uint8).repeat(3, axis=2)


def plural(noun: str) -> str:
    """`circles`, `crosses`."""
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def plain_caption(objects: list[dict]) -> str:
    """`two shapes: a small red circle and a large blue cross` (no positions)."""
    parts = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objects]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS[len(objects)]} shape{'s' if len(objects) > 1 else ''}: {listing}"


# --- the suite -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShapesSFT:
    """Random access to the synthetic SFT examples: `suite.example(task, split, index)`."""

    seed: int = 0
    resolution: int = 64
    max_objects: int = 3

    def __post_init__(self):
        if self.resolution < MIN_RESOLUTION:
            raise ValueError(f"sft shapes: resolution={self.resolution} must be >= {MIN_RESOLUTION}")
        if not 1 <= self.max_objects <= 9:
            raise ValueError(f"sft shapes: max_objects={self.max_objects} must be in [1, 9]")

    def scene(self, task: str, split: str, index: int) -> list[dict]:
        if task not in TASKS:
            raise ValueError(f"unknown SFT task {task!r} (known: {', '.join(TASKS)})")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        if not 0 <= index < EVAL_OFFSET // len(TASKS):
            raise IndexError(f"sft shapes: index {index} out of range")
        stream = index * len(TASKS) + TASKS.index(task) + (EVAL_OFFSET if split == "eval" else 0)
        return shapes_scene(stream, self.seed, self.resolution, self.max_objects)

    def example(self, task: str, split: str, index: int) -> SFTExample:
        objects = self.scene(task, split, index)
        rng = np.random.default_rng([self.seed, TASKS.index(task), SPLITS.index(split), index, 1])
        phrasing = int(rng.integers(len(PHRASINGS[task])))
        image, boxes = render_shapes(objects, self.resolution)
        for o, box in zip(objects, boxes):
            o["bbox"] = box
        fields, meta = getattr(self, f"_{task}")(objects, image, rng)
        meta = {"objects": objects, "phrasing": phrasing, **meta}
        return format_example(task, {"image": image, **fields}, phrasing,
                              f"sft-{task}-{split}-{self.seed}-{index}", meta)

    def _caption(self, objects, image, rng):
        caption = shapes_caption(objects)
        return {"caption": caption}, {"caption": caption}

    def _vqa(self, objects, image, rng):
        kind = VQA_KINDS[int(rng.integers(len(VQA_KINDS)))]
        i = int(rng.integers(len(objects)))
        if kind == "position":  # only objects nameable without their position
            named = [j for j in range(len(objects)) if reference(objects, j, False)]
            if not named:
                kind = "count"
            else:
                i = named[int(rng.integers(len(named)))]
        if kind == "colour":
            question = f"What colour is {reference(objects, i, coloured=False)}?"
            answer = objects[i]["colour"]
        elif kind == "position":
            question = f"Where is {reference(objects, i, False)}?"
            answer = objects[i]["position"]
        else:
            what = int(rng.integers(3))
            if what == 0:
                question, n = "How many shapes are there?", len(objects)
            elif what == 1:
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                question = f"How many {colour} shapes are there?"
                n = sum(o["colour"] == colour for o in objects)
            else:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                question = f"How many {plural(shape)} are there?"
                n = sum(o["shape"] == shape for o in objects)
            answer = NUMBERS[n]
        return ({"question": question, "answer": answer},
                {"kind": kind, "question": question, "answer": answer})

    def _edit(self, objects, image, rng):
        moves = [(i, d) for i, o in enumerate(objects) for d, (dr, dc) in DIRECTIONS.items()
                 if 0 <= o["cell"][0] + dr < 3 and 0 <= o["cell"][1] + dc < 3
                 and not any(p["cell"] == [o["cell"][0] + dr, o["cell"][1] + dc] for p in objects)]
        if moves and rng.random() < 0.5:
            i, direction = moves[int(rng.integers(len(moves)))]
            edit = f"move {reference(objects, i)} {direction}"
            after = move(objects, i, direction, self.resolution)
            info = {"kind": "move", "direction": direction}
        else:
            i = int(rng.integers(len(objects)))
            others = [c for c in COLOURS if c != objects[i]["colour"]]
            colour = others[int(rng.integers(len(others)))]
            edit = f"make {reference(objects, i)} {colour}"
            after = recolour(objects, i, colour)
            info = {"kind": "recolour", "colour": colour}
        target, boxes = render_shapes(after, self.resolution)
        for o, box in zip(after, boxes):
            o["bbox"] = box
        return ({"edit": edit, "target": target},
                {"edit": edit, "object": i, "after": after, **info})

    def _grounding(self, objects, image, rng):
        caption = plain_caption(objects)
        pairs = [(f"{o['colour']} {o['shape']}", o["bbox"]) for o in objects]
        return {"caption": caption, "objects": pairs}, {"caption": caption}

    def _control(self, objects, image, rng):
        kind = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
        cond = edge_map(image) if kind == "edge" else segmentation_map(objects, self.resolution)
        caption = shapes_caption(objects)
        return ({"condition": kind, "condition_image": cond, "caption": caption},
                {"condition": kind, "caption": caption})
