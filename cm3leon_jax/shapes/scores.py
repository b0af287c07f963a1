"""Scores for the synthetic SFT suite, from exact answers and from pixels (for `eval-sft`).

Shapes scenes are flat colours on a flat background, one object per cell of a 3x3 grid, so
a generated image can be read back: each pixel is labelled with the nearest palette colour
(or background, or none when far from all: the detector's `pixel_labels`, the one pixel
reader), and each cell's object is the colour covering at least `MIN_COVER` of the cell. Shape classes are not read from pixels (colour and place
only).

- vqa: the answer text equals the true answer (case and a final '.' ignored).
- caption: the fraction of true objects named as `a {size} {colour} {shape} at the
  {position}` in the text, zero if it names extra ones.
- image scenes (caption -> image, control, edit target): the cells and colours read from
  the pixels equal the true scene's.
- grounding: every object's colour covers at least 30% of its box, and at least 80% of
  each colour's pixels lie inside the boxes of the objects of that colour.
- control agreement: IoU of the image's foreground with the condition scene's foreground.
"""

from __future__ import annotations

import re

import numpy as np

from cm3leon_jax.shapes.detector import NAMES, pixel_labels
from cm3leon_jax.shapes.edits import segmentation_map

MIN_COVER = 0.05  # of a cell's pixels, for a colour to count as an object there
MIN_BOX_FILL = 0.3  # grounding: of a box's pixels in its object's colour (a triangle fills ~1/2)
MIN_INSIDE = 0.8  # grounding: of a colour's pixels inside the boxes of that colour


def read_scene(image: np.ndarray) -> set[tuple[int, int, str]]:
    """{(row, col, colour)} of the objects seen in the pixels (the dominant colour per cell)."""
    labels = pixel_labels(image)
    r = image.shape[0]
    edges = np.round(np.linspace(0, r, 4)).astype(int)
    seen = set()
    for row in range(3):
        for col in range(3):
            cell = labels[edges[row]:edges[row + 1], edges[col]:edges[col + 1]]
            counts = np.bincount(cell[cell > 0], minlength=len(NAMES))
            if counts.max() >= MIN_COVER * cell.size:
                seen.add((row, col, NAMES[int(counts.argmax())]))
    return seen


def true_scene(objects: list[dict]) -> set[tuple[int, int, str]]:
    return {(o["cell"][0], o["cell"][1], o["colour"]) for o in objects}


def score_vqa(meta: dict, text: str) -> float:
    def norm(s):
        return s.strip().lower().rstrip(".").strip()

    return float(norm(text) == norm(meta["answer"]))


_OBJECT = re.compile(r"an? (small|large) (\w+) (\w+) at the ((?:top|middle|bottom) \w+|center)")


def score_caption(meta: dict, text: str) -> float:
    named = set(_OBJECT.findall(text))
    truth = {(o["size"], o["colour"], o["shape"], o["position"]) for o in meta["objects"]}
    if named - truth:
        return 0.0
    return len(named & truth) / len(truth)


def score_scene(objects: list[dict], image: np.ndarray) -> float:
    """1 when the pixels show exactly these objects' colours in these cells."""
    return float(read_scene(image) == true_scene(objects))


def score_edit(meta: dict, image: np.ndarray) -> float:
    """The asked attribute changed and the rest kept: the pixels show the `after` scene."""
    return score_scene(meta["after"], image)


def score_grounding(meta: dict, image: np.ndarray) -> float:
    labels = pixel_labels(image)
    boxes = {}  # colour -> union of its objects' boxes
    for o in meta["objects"]:
        x1, y1, x2, y2 = o["bbox"]
        colour = labels == NAMES.index(o["colour"])
        if colour[y1:y2, x1:x2].sum() < MIN_BOX_FILL * (x2 - x1) * (y2 - y1):
            return 0.0
        boxes.setdefault(o["colour"], np.zeros(labels.shape, bool))[y1:y2, x1:x2] = True
    for name, inside in boxes.items():
        colour = labels == NAMES.index(name)
        if (colour & inside).sum() < MIN_INSIDE * colour.sum():
            return 0.0
    return 1.0


def score_control(meta: dict, image: np.ndarray) -> float:
    """IoU of the image's foreground with the scene the condition map was computed from."""
    want = segmentation_map(meta["objects"], image.shape[0]).any(-1)
    got = pixel_labels(image) > 0
    union = (want | got).sum()
    return float((want & got).sum() / union) if union else 1.0
