"""Reranking: keep the candidates an image-text similarity likes best (CM3Leon Table 1:
8 samples per prompt, best by CLIP: `clip_scorer`; or by the run's retrieval dual encoder:
`dual_scorer`; any `score(images, captions)` callable works)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cm3leon_jax.perception import clip as clip_lib
from cm3leon_jax.retrieval import embed

Score = Callable[[list, list], Sequence[float]]


def clip_scorer(clip: clip_lib.Clip) -> Score:
    """CLIP cosine of each (image, caption string) pair."""
    return lambda images, captions: clip_lib.pair_cosines(clip, images, captions)


def dual_scorer(encoder) -> Score:
    """Cosine of the encoder's text-only query vector (as `retrieval/query.py` embeds a
    prompt) and the candidate's vector as an image-only bank document (its unit image
    embedding, `embed.document_vectors`): the score retrieval itself would give. Captions
    are encoder documents, `{"text": ids, "caption": str, "image": []}`."""
    if encoder is None or not encoder.has_image:
        raise ValueError("the retrieval encoder has no image tower (retrieval.encoder must "
                         "be builtin or clip to rerank by it)")

    def score(images, captions):
        text = embed.unit(encoder.embed_texts([encoder.text_tokens(c) for c in captions]))
        image = embed.document_vectors(np.zeros_like(text), encoder.embed_images(np.stack(images)))
        return (text.astype(np.float64) * image).sum(-1)

    return score


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
