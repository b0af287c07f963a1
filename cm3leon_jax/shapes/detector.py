"""Reading a `shapes` image back from its pixels: which coloured shapes it shows, how big
and where — so generated images and captions can be scored without an external model.

Each pixel takes the nearest palette colour (or background, or "unknown" when it is far
from all of them, as blurred VQ reconstructions can be); each colour's connected regions
above a minimum area are objects; an object's shape is the template (drawn with the
source's own `shape_mask` in the object's bounding square) that overlaps it best; its
size and grid cell follow from the bounding square and the centroid.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np
from scipy import ndimage

from cm3leon_jax.shapes.world import (BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZE_FRACTION,
                                      shape_mask)

PALETTE = np.array([BACKGROUND, *COLOURS.values()], np.float32)  # index 0 = background
NAMES = ("background", *COLOURS)
MAX_DISTANCE = 60.0  # RGB distance beyond which a pixel is "unknown" (palette gap >= 120)
MIN_AREA = 0.03  # of a grid cell's area: smaller regions are noise (the smallest shape ~0.1)
# diameter / cell width halfway between the two sizes (fractions of the free width 0.9 cell)
SIZE_SPLIT = 0.9 * (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2
SEARCH_BELOW = 16  # objects narrower than this (pixels) get the template search
SEARCH_STEPS = (-0.5, -0.25, 0.0, 0.25, 0.5)
# Equal fits go to the earlier shape: a 4x4 block is a small square, or a small circle
# centred on a pixel corner; the square is the likelier of the two.
TIE_ORDER = ("square", "cross", "circle", "triangle")
_CAPTION_OBJECT = re.compile(
    rf"\b({'|'.join(SIZE_FRACTION)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    rf"(?: at the ({'|'.join(p for row in POSITIONS for p in row)}))?")


@dataclasses.dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    position: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (end exclusive)
    fit: float  # IoU of the region with its best shape template


def pixel_labels(image: np.ndarray) -> np.ndarray:
    """int [H, W]: palette index of each pixel (0 background), -1 when far from all."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    d = np.linalg.norm(image[:, :, None, :].astype(np.float32) - PALETTE, axis=-1)
    labels = d.argmin(-1)
    return np.where(d.min(-1) <= MAX_DISTANCE, labels, -1)


def _best_shape(region: np.ndarray) -> tuple[str, float, float]:
    """(shape, IoU, half-width) of the template that fits a boolean crop best.

    Below SEARCH_BELOW pixels across, rasterisation decides the shape of a few pixels, so
    the template's centre and half-width are also searched around the bounding box's.
    """
    ys, xs = np.nonzero(region)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half = max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = max(region.shape)
    steps = np.asarray(SEARCH_STEPS if 2 * half < SEARCH_BELOW else (0.0,))
    ox, oy, oh = (a.reshape(-1, 1, 1) for a in np.meshgrid(steps, steps, steps))
    best = ("", -1.0, half)
    for shape in TIE_ORDER:  # every offset at once: shape_mask broadcasts over its arguments
        t = shape_mask(shape, cx + ox, cy + oy, half + oh, size)
        t = t[:, :region.shape[0], :region.shape[1]]
        iou = (t & region).sum((1, 2)) / np.maximum((t | region).sum((1, 2)), 1)
        i = int(iou.argmax())
        if iou[i] > best[1]:
            best = (shape, float(iou[i]), half + float(oh.flat[i]))
    return best


def detect(image: np.ndarray) -> list[Detection]:
    """The coloured shapes in a square `shapes` image, in reading order of their cells."""
    labels = pixel_labels(image)
    height, width = labels.shape
    cell = width / 3
    found = []
    for k, colour in enumerate(NAMES[1:], start=1):
        regions, _ = ndimage.label(labels == k, structure=np.ones((3, 3)))
        for i, box in enumerate(ndimage.find_objects(regions), start=1):
            y0, x0 = max(box[0].start - 2, 0), max(box[1].start - 2, 0)
            region = regions[y0:box[0].stop + 2, x0:box[1].stop + 2] == i
            if region.sum() < MIN_AREA * cell * cell:
                continue
            shape, fit, half = _best_shape(region)
            ys, xs = np.nonzero(region)
            row = min(int((ys.mean() + y0) / (height / 3)), 2)
            col = min(int((xs.mean() + x0) / cell), 2)
            found.append(Detection(colour, shape, "large" if 2 * half > SIZE_SPLIT * cell
                                   else "small", POSITIONS[row][col],
                                   (int(xs.min() + x0), int(ys.min() + y0),
                                    int(xs.max() + x0) + 1, int(ys.max() + y0) + 1), fit))
    order = {p: i for i, p in enumerate(p for row in POSITIONS for p in row)}
    return sorted(found, key=lambda d: (order[d.position], d.bbox))


def caption_objects(caption: str) -> list[dict]:
    """The objects a shapes caption names: [{size, colour, shape, position}] (position None
    when the caption leaves it out)."""
    return [dict(zip(("size", "colour", "shape", "position"), m.groups()))
            for m in _CAPTION_OBJECT.finditer(caption)]


def _pairs(objects) -> collections.Counter:
    get = lambda o, k: o[k] if isinstance(o, dict) else getattr(o, k)
    return collections.Counter((get(o, "colour"), get(o, "shape")) for o in objects)


def image_matches(image: np.ndarray, caption: str) -> bool:
    """Does the image show every (colour, shape) the caption names? (an unparseable
    caption names nothing and never matches)"""
    wanted = _pairs(caption_objects(caption))
    return bool(wanted) and not (wanted - _pairs(detect(image)))


def match_scores(images, captions) -> np.ndarray:
    """Per (image, caption) pair, the fraction of the caption's (colour, shape) objects the
    image shows: a `score` for `generate.rerank.rerank` on shapes data."""
    out = []
    for image, caption in zip(images, captions):
        wanted = _pairs(caption_objects(caption))
        missing = wanted - _pairs(detect(image))
        out.append(1 - sum(missing.values()) / max(sum(wanted.values()), 1))
    return np.asarray(out, np.float64)


def caption_matches(generated: str, truth: list[dict]) -> bool:
    """Does a generated caption name exactly the true objects' colours and shapes?"""
    return _pairs(caption_objects(generated)) == _pairs(truth)
