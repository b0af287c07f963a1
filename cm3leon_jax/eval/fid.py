"""Fréchet Inception Distance between two image sets, the number the torch tools give.

FID values are only comparable when every step matches the tools papers report with, so
no step is reinvented: pixels are clean-resized to 299 (clean-fid's rule), features come
from the FID Inception (`perception.inception`, tested equal to torch-fidelity's), the
statistics are the float64 mean and `np.cov`, and the distance is pytorch-fid's
`calculate_frechet_distance` line for line (scipy's sqrtm, the 1e-6 diagonal retry when
the root is not finite, the imaginary-part check), which the tests hold it to.
A folder streams through in batches, so a 50k-image set never sits in memory whole;
statistics saved as an `.npz` with `mu` and `sigma` (pytorch-fid's `--save-stats` format)
stand in for either side. FID is biased by the set size: compare numbers computed from
equally many images, and at least 2048 of them for full-rank covariances. Folders and
statistics may be on cloud storage (storage.py).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image
from scipy import linalg

from cm3leon_jax import storage
from cm3leon_jax.perception.inception import (
    Inception,
    pool_features,
    resize_for_inception,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- images


def image_files(folder: storage.PathLike) -> list[storage.Path]:
    """The PNG/JPEG files directly in `folder`, sorted by name."""
    folder = storage.path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def load_image(file: storage.PathLike) -> np.ndarray:
    """One file -> uint8 [H, W, 3]; grayscale, palette and RGBA converted by PIL."""
    try:
        with storage.path(file).open("rb") as f, Image.open(f) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except Exception as e:  # any decoder failure (PIL raises several kinds): name the file
        raise ValueError(f"{file}: not a readable image ({e})") from e


def center_square(image: np.ndarray) -> np.ndarray:
    """The central square of an image (COCO protocols crop before resizing)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def features_of(folder: storage.PathLike, inception: Inception, batch_size: int = 50,
                dims: int = 2048, center_crop: bool = False) -> np.ndarray:
    """Pool features float64 [N, dims] of a folder's images, read `batch_size` at a time
    (with `center_crop`, each image's central square)."""
    return features_of_files(image_files(folder), inception, batch_size, dims, center_crop)


def features_of_files(files: list[storage.Path], inception: Inception, batch_size: int = 50,
                      dims: int = 2048, center_crop: bool = False) -> np.ndarray:
    """Pool features float64 [N, dims] of these image files, read `batch_size` at a time."""
    crop = center_square if center_crop else (lambda image: image)
    batch = max(1, min(batch_size, len(files)))
    out = []
    for start in range(0, len(files), batch):
        chunk = np.concatenate([resize_for_inception(crop(load_image(f))[None])
                                for f in files[start:start + batch]])
        rows = len(chunk)
        if rows < batch:  # pad to the compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch - rows, *chunk.shape[1:]),
                                                    chunk.dtype)])
        out.append(pool_features(inception, chunk, batch, dims)[:rows])
    return np.concatenate(out)


# ------------------------------------------------------------------------- statistics


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] -> (mean [D], covariance [D, D]), float64, `np.cov` (N - 1)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID statistics need features [N >= 2, D], got shape "
                         f"{features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed as
    pytorch-fid's `calculate_frechet_distance` does (its errors raised as ValueError,
    its printed note a warning)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors of different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances of different shapes: {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2

    # Product might be almost singular
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to "
                      f"diagonal of cov estimates", RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

    # Numerical error might give slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m}")
        covmean = covmean.real

    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def save_stats(path: storage.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int | None) -> None:
    """mu, sigma and the image count to an `.npz` (pytorch-fid reads mu and sigma)."""
    path = storage.path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: FID statistics are written as .npz")
    count = {} if n is None else {"n": np.int64(n)}  # unknown for pytorch-fid's statistics
    with path.open("wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                 **count)


def load_stats(path: storage.PathLike) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n) from an `.npz`; n is None when the file does not say (pytorch-fid's)."""
    path = storage.path(path)
    try:
        with path.open("rb") as f, np.load(f) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # a missing, truncated or non-npz file: name it
        raise ValueError(f"{path}: cannot read FID statistics ({e})") from e
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: FID statistics need arrays 'mu' and 'sigma'; missing "
                         f"{missing}, found {sorted(arrays)}")
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean "
                         f"[D] and a covariance [D, D]")
    return mu, sigma, int(arrays["n"]) if "n" in arrays else None


def stats_of(path: storage.PathLike, inception: Inception | None, batch_size: int = 50,
             dims: int = 2048, center_crop: bool = False
             ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n) of a folder of images (through `inception`) or of a saved `.npz`."""
    path = storage.path(path)
    if path.is_dir():
        if inception is None:
            raise ValueError(f"{path}: a folder of images needs the Inception weights")
        features = features_of(path, inception, batch_size, dims, center_crop)
        if len(features) < 2:
            raise ValueError(f"{path}: FID needs at least 2 images, found {len(features)}")
        mu, sigma = statistics(features)
        return mu, sigma, len(features)
    if path.suffix == ".npz":
        mu, sigma, n = load_stats(path)
        if mu.shape != (dims,):
            raise ValueError(f"{path}: statistics of {len(mu)}-d features, expected {dims}")
        return mu, sigma, n
    raise ValueError(f"{path}: neither a folder of images nor an .npz of FID statistics")


def fid(real: storage.PathLike, fake: storage.PathLike, inception: Inception | None,
        batch_size: int = 50, dims: int = 2048, center_crop: bool = False) -> dict:
    """FID between two folders of images and/or `.npz` statistics (either side).

    `dims` picks the feature layer (2048, the pool3 of every published FID, unless a
    smaller one is wanted on purpose: 64, 192, 768 as pytorch-fid's `--dims`)."""
    mu1, sigma1, n_real = stats_of(real, inception, batch_size, dims, center_crop)
    mu2, sigma2, n_fake = stats_of(fake, inception, batch_size, dims, center_crop)
    return {"fid": frechet_distance(mu1, sigma1, mu2, sigma2), "n_real": n_real,
            "n_fake": n_fake}
