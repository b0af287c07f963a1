"""Pictures of samples: images side by side in one PNG-ready array."""

from __future__ import annotations

import math

import numpy as np


def image_grid(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 picture, `columns` images a row, white gaps."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h,
             gap + c * (w + gap):gap + c * (w + gap) + w] = im
    return grid
