"""SFT examples -> training rows (the `inputs, targets, positions, segment_ids, weights`
contract of cm3leon_jax/data/synthetic.py and train/step.py).

Each tokenized example becomes `<eos> example <eos>` (the pretraining document frame) and
examples are packed greedily into rows of seq_len + 1 tokens, one segment id each (1, 2,
...; 0 is padding), positions restarting per example. Two losses:

- `loss="all"`: every target inside its example counts, as CM3Leon's SFT (the paper uses
  the pretraining objective on instruction + output; CM3 span masking, when enabled, is
  applied to the tokens before packing by the pretraining transform).
- `loss="response"`: Chameleon's prompt masking: only targets in the response count, the
  tokens after the example's last `<break>` (the image to generate in the text-first
  templates, the target image for edit and control) and the closing `<eos>`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from cm3leon_jax.vocab import Vocab

LOSSES = ("all", "response")


def response_mask(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """bool per token of `ids`: True after its last `<break>` (all True without one)."""
    breaks = np.flatnonzero(np.asarray(ids) == vocab.brk)
    mask = np.ones(len(ids), bool)
    if breaks.size:
        mask[:breaks[-1] + 1] = False
    return mask


def sft_row(examples: list[np.ndarray], seq_len: int, vocab: Vocab, loss: str = "all") -> dict:
    """One row from tokenized examples that fit in it together (`<eos>` frames included)."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {list(LOSSES)}")
    tokens = np.full(seq_len + 1, vocab.pad, np.int32)
    segments = np.zeros(seq_len + 1, np.int32)
    positions = np.zeros(seq_len + 1, np.int32)
    counted = np.zeros(seq_len + 1, bool)  # tokens whose prediction counts as a target
    at = 0
    for seg, ids in enumerate(examples, start=1):
        framed = np.concatenate([[vocab.eos], np.asarray(ids, np.int32), [vocab.eos]])
        n = len(framed)
        if at + n > seq_len + 1:
            raise ValueError(f"examples of {sum(len(e) + 2 for e in examples)} framed tokens "
                             f"do not fit a row of {seq_len + 1}")
        tokens[at:at + n] = framed
        segments[at:at + n] = seg
        positions[at:at + n] = np.arange(n)
        resp = np.concatenate([[False], response_mask(ids, vocab), [True]])
        counted[at:at + n] = resp if loss == "response" else True
        at += n
    same = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "positions": positions[:-1],
            "segment_ids": segments[:-1],
            "weights": (same & counted[1:]).astype(np.float32)}


def pack_rows(examples: Iterable[np.ndarray], seq_len: int, vocab: Vocab,
              loss: str = "all") -> Iterator[dict]:
    """Greedy packing in order: a row closes when the next example does not fit. An example
    longer than a row is an error naming its length (raise seq_len or shrink the images)."""
    row, used = [], 0
    for i, ids in enumerate(examples):
        n = len(ids) + 2
        if n > seq_len + 1:
            raise ValueError(f"SFT example {i} has {n} tokens with its <eos> frame, more than "
                             f"data.seq_len + 1 = {seq_len + 1}")
        if used + n > seq_len + 1:
            yield sft_row(row, seq_len, vocab, loss)
            row, used = [], 0
        row.append(ids)
        used += n
    if row:
        yield sft_row(row, seq_len, vocab, loss)
