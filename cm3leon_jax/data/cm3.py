"""The CM3 objective (CM3Leon §2.2; metaseq `cm3_dataset.py`): move spans to the end.

    <eos> cap <break> img <eos>  ->  <eos> cap <break> im<mask:0> <eos> <mask:0> g... <eoss>

- n ~ Poisson(lambda) clamped to [0, S-1] (S = vocab.num_sentinels); 0 leaves the example
  plain causal (e^-1 = 37% of examples at lambda = 1, as in metaseq).
- The n spans come from 2n distinct uniform cut points over the maskable tokens, sorted and
  paired, so they never overlap and there are always exactly n of them (metaseq draws n^2
  candidate spans and keeps non-overlapping ones greedily, which may return fewer; this
  keeps the Poisson count exact). Each span is then clipped to the one segment it overlaps
  most. Segments are the runs between `<break>` and `<eos>`: a span never contains or
  crosses either, so the leading `<eos>` is never masked either.
- With probability `whole_segment` one of the n spans is a whole segment (a whole caption or
  image, of the query or of a retrieved document), chosen uniformly among the example's
  segments whatever their lengths (metaseq's `cm3_percent_full_document_rotation`); the
  other n - 1 spans come from the rest as above. Without it a caption is almost never
  masked whole at paper shapes (a 20-token caption beside 3,000 image tokens), and that is
  the layout of classifier-free guidance's unconditional stream and of captioning by
  infilling.
- Output: the source with `<mask:i>` in place of span i, then `<mask:i> span_i <eoss>` for
  each span. The example is first cut so the output fits `max_len` (metaseq truncates the
  causal part so the moved spans fit), so every sentinel has its span and `unmask` inverts
  the output exactly.

Pure numpy, randomness only from the `rng` passed in.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cm3leon_jax.vocab import Vocab

EXTRA_PER_SPAN = 3  # <mask:i> in place, <mask:i> and <eoss> at the end


def span_count(rng: np.random.Generator, lam: float, vocab: Vocab) -> int:
    """n ~ Poisson(lam) clamped to [0, S-1]."""
    return int(min(rng.poisson(lam), vocab.num_sentinels - 1))


def _boundaries(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    return (tokens == vocab.eos) | (tokens == vocab.brk)


def choose_spans(tokens: np.ndarray, n: int, rng: np.random.Generator, vocab: Vocab,
                 whole_segment: float = 0.0) -> list[tuple[int, int]]:
    """Up to n sorted, disjoint [start, end) spans, each inside one segment; with
    probability `whole_segment` one of them is a whole segment, chosen uniformly.

    Exactly n unless the example has too few maskable tokens (fewer than 2n - 1 outside a
    whole-segment span).
    """
    boundary = _boundaries(tokens, vocab)
    maskable = np.flatnonzero(~boundary)
    label = np.cumsum(boundary)[maskable]  # segment of each maskable token (non-decreasing)
    n = min(n, (maskable.size + 1) // 2)
    spans: list[tuple[int, int]] = []
    if n and whole_segment and rng.random() < whole_segment:
        segments = np.unique(label)
        lab = segments[rng.integers(segments.size)]
        lo, hi = np.searchsorted(label, [lab, lab + 1])
        spans.append((int(maskable[lo]), int(maskable[hi - 1]) + 1))
        rest = label != lab
        maskable, label = maskable[rest], label[rest]
        n = min(n - 1, (maskable.size + 1) // 2)
    if n:
        picks = np.sort(rng.choice(maskable.size + 1, 2 * n, replace=False))
        for a, b in zip(picks[0::2], picks[1::2]):  # maskable tokens a..b-1
            labels, counts = np.unique(label[a:b], return_counts=True)
            lab = labels[np.argmax(counts)]
            lo = a + np.searchsorted(label[a:b], lab, "left")
            hi = a + np.searchsorted(label[a:b], lab, "right")
            spans.append((int(maskable[lo]), int(maskable[hi - 1]) + 1))
    return sorted(spans)


def apply_spans(tokens: np.ndarray, spans: list[tuple[int, int]], vocab: Vocab
                ) -> tuple[np.ndarray, np.ndarray]:
    """(masked tokens, origin): origin[j] is the input index output token j came from (for
    an inserted `<mask:i>` or `<eoss>`, the first token of its span)."""
    if not spans:
        return tokens.copy(), np.arange(tokens.size)
    toks, orig = [], []
    prev = 0
    for i, (s, e) in enumerate(spans):
        toks += [tokens[prev:s], [vocab.sentinel(i)]]
        orig += [np.arange(prev, s), [s]]
        prev = e
    toks.append(tokens[prev:])
    orig.append(np.arange(prev, tokens.size))
    for i, (s, e) in enumerate(spans):
        toks += [[vocab.sentinel(i)], tokens[s:e], [vocab.eoss]]
        orig += [[s], np.arange(s, e), [s]]
    return np.concatenate(toks).astype(np.int32), np.concatenate(orig).astype(np.int64)


def unmask(masked: np.ndarray, vocab: Vocab) -> np.ndarray:
    """The inverse of `apply_spans`: put every moved span back in place of its sentinel."""
    masked = np.asarray(masked)
    sent = np.flatnonzero(vocab.is_sentinel(masked))
    if sent.size == 0:
        return masked.copy()
    if sent.size % 2:
        raise ValueError(f"{sent.size} sentinels: not a CM3 sequence (expected 2 per span)")
    n = sent.size // 2
    ids = masked[sent] - vocab.sentinel_offset
    if not (np.array_equal(ids[:n], np.arange(n)) and np.array_equal(ids[n:], np.arange(n))):
        raise ValueError(f"sentinels out of order: {ids.tolist()}")
    ends = np.flatnonzero(masked == vocab.eoss)
    if ends.size != n or not np.all(ends > sent[n:]) or \
            not np.all(ends[:-1] < sent[n + 1:]) or ends[-1] != masked.size - 1:
        raise ValueError("moved spans are not each closed by one <eoss>")
    parts, prev = [], 0
    for i in range(n):
        parts += [masked[prev:sent[i]], masked[sent[n + i] + 1:ends[i]]]
        prev = sent[i] + 1
    parts.append(masked[prev:sent[n]])
    return np.concatenate(parts)


class Masked(NamedTuple):
    tokens: np.ndarray  # the masked example
    origin: np.ndarray  # input index of each output token (see apply_spans)
    truncated: int  # input tokens cut so the output fits
    spans: list[tuple[int, int]]  # the masked [start, end) input ranges, sorted


def cm3_transform(tokens: np.ndarray, rng: np.random.Generator, vocab: Vocab, lam: float,
                  max_len: int, whole_segment: float = 0.0) -> Masked:
    """The example cut so the output fits `max_len`, then masked."""
    if vocab.is_sentinel(tokens).any() or (tokens == vocab.eoss).any():
        raise ValueError("the example already holds <mask:i> or <eoss> tokens")
    n = span_count(rng, lam, vocab)
    keep = min(tokens.size, max_len - EXTRA_PER_SPAN * n)
    if keep < 1:
        n, keep = 0, min(tokens.size, max_len)
    spans = choose_spans(tokens[:keep], n, rng, vocab, whole_segment)
    masked, origin = apply_spans(tokens[:keep], spans, vocab)
    return Masked(masked, origin, tokens.size - keep, spans)


def target_weights(masked: np.ndarray, origin: np.ndarray, is_retrieved: np.ndarray,
                   vocab: Vocab, sentinel_weight: float, retrieved_weight: float
                   ) -> np.ndarray:
    """Loss weight of predicting masked[1:]: `retrieved_weight` on tokens of retrieved
    documents, times `sentinel_weight` on `<mask:i>` targets, 1 elsewhere."""
    targets = masked[1:]
    w = np.where(is_retrieved[origin[1:]], np.float32(retrieved_weight), np.float32(1))
    if sentinel_weight != 1:
        w = np.where(vocab.is_sentinel(targets), w * np.float32(sentinel_weight), w)
    return w.astype(np.float32)
