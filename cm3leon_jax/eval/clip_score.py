"""CLIP score of generated images against their captions (Hessel et al. 2021, with w = 100).

Why: text-to-image quality is reported as FID (realism) and CLIP score (agreement with the
prompt); this is the second. Per pair it is 100 * max(cos(image, caption), 0) between the
L2-normalised CLIP embeddings, and the result is the mean over pairs. torchmetrics'
`CLIPScore` clamps the mean instead of each pair; the two agree unless a pair's cosine is
negative, which real CLIP models hardly give a caption and its image. Numbers compare only
under the same checkpoint (ViT-B/32, ViT-L/14, ...): name it next to every number.

The captions file is JSONL, one `{"image": NAME, "caption": TEXT}` per line, NAME relative
to the images folder. Every line is checked (and that its image exists) before any image is
embedded; an error names the file and the line. Both may be on cloud storage (storage.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.perception.clip import Clip, pair_cosines


def score_of(cosines: np.ndarray) -> np.ndarray:
    """The CLIP score of each pair from its cosine: 100 * max(cos, 0)."""
    return 100.0 * np.maximum(np.asarray(cosines, np.float64), 0.0)


def pair_scores(clip: Clip, images, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """100 * max(cos, 0) for each (image, caption) pair, float64 [N]."""
    return score_of(pair_cosines(clip, images, captions, batch_size))


def clip_score(clip: Clip, images_uint8, captions: Sequence[str],
               batch_size: int = 64) -> dict:
    """uint8 images ([N, H, W, 3] or a list of [H, W, 3]) and their N captions ->
    {"clip_score": mean over pairs of 100 * max(cos, 0), "n": N}."""
    if len(images_uint8) == 0:
        raise ValueError("no images to score")
    s = pair_scores(clip, images_uint8, captions, batch_size)
    return {"clip_score": float(s.mean()), "n": len(s)}


def read_captions(path: storage.PathLike,
                  images_dir: storage.PathLike | None = None) -> list[dict]:
    """The records of a captions JSONL (blank lines skipped), each checked: a JSON object with
    string `image` and `caption`; with `images_dir`, the image file must exist under it."""
    path = storage.path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such captions file")
    images_dir = storage.path(images_dir) if images_dir is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise ConfigError(f"{images_dir}: no such images directory")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{where}: a JSON object expected, got {type(rec).__name__}")
            for key in ("image", "caption"):
                if key not in rec:
                    raise ConfigError(f"{where}: no {key!r} key (each line holds "
                                      f'{{"image": ..., "caption": ...}})')
                if not isinstance(rec[key], str):
                    raise ConfigError(f"{where}: {key!r} must be a string, got "
                                      f"{type(rec[key]).__name__}")
            if images_dir is not None and not (images_dir / rec["image"]).is_file():
                raise ConfigError(f"{where}: image {rec['image']!r} not found under "
                                  f"{images_dir}")
            out.append(rec)
    if not out:
        raise ConfigError(f"{path}: no captions")
    return out


def _load_image(path: storage.Path) -> np.ndarray:
    try:
        with path.open("rb") as f, Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # any decoder failure (PIL raises several kinds): name the file
        raise ConfigError(f"{path}: not a readable image ({e})") from None


def clip_score_files(clip: Clip, images_dir: storage.PathLike, captions_jsonl: storage.PathLike,
                     batch_size: int = 64) -> dict:
    """`clip_score` of the images named by a captions JSONL, read from `images_dir` a batch
    at a time (all lines checked first)."""
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be >= 1")
    records = read_captions(captions_jsonl, images_dir)
    images_dir = storage.path(images_dir)
    scores = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        images = [_load_image(images_dir / r["image"]) for r in chunk]
        scores.append(pair_scores(clip, images, [r["caption"] for r in chunk], batch_size))
    s = np.concatenate(scores)
    return {"clip_score": float(s.mean()), "n": len(s)}
