"""Operations on a shapes scene (a list of object dicts, shapes/world.py): naming an object
unambiguously, recolouring or moving it, and the condition maps drawn from a scene (edges,
segmentation). Pure functions of the scene; the SFT suite builds its tasks from them.
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.shapes.world import COLOURS, NUMBERS, POSITIONS, shape_mask

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SEGMENT_COLOURS = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255),
                   "cross": (255, 255, 0)}  # segmentation map: one colour per shape class


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
