"""Pictures of samples: images side by side in one PNG-ready array, and image files
written anywhere (local or cloud storage, storage.py)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError


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


def image_format(path: storage.PathLike) -> str:
    """PIL's format for a file name (.png, .jpg, ...): a stream has no name to go by."""
    found = Image.registered_extensions().get(storage.path(path).suffix.lower())
    if found is None:
        raise ConfigError(f"{path}: not an image file name (e.g. .png)")
    return found


def save_image(path: storage.PathLike, pixels: np.ndarray) -> None:
    """uint8 [H, W, 3] pixels as the image file `path` names."""
    path = storage.path(path)
    fmt = image_format(path)
    with path.open("wb") as f:
        Image.fromarray(pixels).save(f, format=fmt)
