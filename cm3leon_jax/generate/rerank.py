"""Reranking: keep the candidates an image-text similarity likes best (CM3Leon Table 1:
8 samples per prompt, best by CLIP: `clip_scorer`; any `score(images, captions)` callable
works, such as the retrieval dual encoder's similarity)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cm3leon_jax.perception import clip as clip_lib

Score = Callable[[list, list], Sequence[float]]


def clip_scorer(clip: clip_lib.Clip) -> Score:
    """CLIP cosine of each (image, caption string) pair."""
    return lambda images, captions: clip_lib.pair_cosines(clip, images, captions)


def rerank(candidates: Sequence[Sequence], captions: Sequence, score: Score,
           keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """candidates[i][j] is candidate j for captions[i]. Calls `score` once on all pairs
    (flattened caption-major) and returns (indices [n, keep] of the best candidates, best
    first; scores [n, M])."""
    n = len(candidates)
    if n != len(captions):
        raise ValueError(f"{n} candidate groups but {len(captions)} captions")
    m = {len(c) for c in candidates}
    if len(m) != 1:
        raise ValueError(f"every caption needs the same number of candidates, got {sorted(m)}")
    (m,) = m
    if not 1 <= keep <= m:
        raise ValueError(f"keep={keep} must be in [1, {m}] (candidates per caption)")
    images = [im for group in candidates for im in group]
    texts = [c for c in captions for _ in range(m)]
    scores = np.asarray(score(images, texts), np.float64)
    if scores.shape != (n * m,):
        raise ValueError(f"score returned shape {scores.shape}, expected ({n * m},): one "
                         "similarity per (image, caption) pair")
    if not np.all(np.isfinite(scores)):
        raise ValueError("score returned non-finite similarities")
    scores = scores.reshape(n, m)
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :keep], scores
