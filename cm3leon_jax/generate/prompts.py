"""Prompt layouts for generation, matching the training sequences (DESIGN.md, Sequences).

A training document is `<eos> caption <break> image <eos>`; CM3 masking replaces a span by
`<mask:i>` and appends `<mask:i> span <eoss>` after the document. So:

- text -> image: `<eos> caption <break>`, then the image tokens; the unconditional stream
  is the same document with the caption masked, `<eos> <mask:0> <break>` (CM3Leon §3.1).
- image -> text: the caption masked and asked back, `<eos> <mask:0> <break> image <eos>
  <mask:0>`, decoded until `<eoss>` (CM3Leon: "Image of <mask>: [image] <infill>").
- caption scoring: the image -> text prompt followed by the caption and its closing
  `<eoss>`, the tokens a decoded caption would be.
- text infilling: `<eos> before <mask:0> after <eos> <mask:0>`, decoded until `<eoss>`.
- two-scale guidance (image + text conditioned image): full `<eos> caption <break> source
  <break>`, image-only `<eos> <mask:0> <break> source <break>`, unconditional as above.

Callers pass ids already in the unified vocabulary (`Vocab.text_ids`, `Vocab.image_ids`).
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.vocab import Vocab


def _check(vocab: Vocab, ids, kind: str, where: str) -> np.ndarray:
    a = np.asarray(ids, np.int32).reshape(-1)
    ok = {"text": vocab.is_text, "image": vocab.is_image,
          "document": lambda x: vocab.is_text(x) | vocab.is_image(x) | (x == vocab.brk)}[kind](a)
    if not np.all(ok):
        bad = a[~np.asarray(ok)][0]
        raise ValueError(f"{where}: id {bad} ({vocab.token_name(int(bad))}) is not a "
                         f"{kind} id")
    return a


def text_to_image(vocab: Vocab, caption) -> tuple[np.ndarray, np.ndarray]:
    """(conditional, unconditional) prompts; the image follows the final <break>."""
    caption = _check(vocab, caption, "text", "caption")
    cond = np.concatenate([[vocab.eos], caption, [vocab.brk]])
    return cond.astype(np.int32), unconditional_image(vocab)


def with_retrieved(vocab: Vocab, prompt: np.ndarray, retrieved) -> np.ndarray:
    """`prompt` (which starts with `<eos>`) with retrieved documents in front, as in training:
    `<eos> r1 <break> ... rk <break> rest` (data/sequences.py `example`)."""
    parts = [prompt[:1]]
    for r in retrieved:
        parts += [_check(vocab, r, "document", "retrieved document"), [vocab.brk]]
    return np.concatenate(parts + [prompt[1:]]).astype(np.int32)


def unconditional_image(vocab: Vocab) -> np.ndarray:
    return np.array([vocab.eos, vocab.sentinel(0), vocab.brk], np.int32)


def edit_image(vocab: Vocab, caption, source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(full, unconditional, image-only) prompts for two-scale guidance."""
    caption = _check(vocab, caption, "text", "caption")
    source = _check(vocab, source, "image", "source image")
    tail = np.concatenate([[vocab.brk], source, [vocab.brk]])
    full = np.concatenate([[vocab.eos], caption, tail])
    image_only = np.concatenate([[vocab.eos, vocab.sentinel(0)], tail])
    return full.astype(np.int32), unconditional_image(vocab), image_only.astype(np.int32)


def image_to_text(vocab: Vocab, image) -> np.ndarray:
    image = _check(vocab, image, "image", "image")
    m = vocab.sentinel(0)
    return np.concatenate([[vocab.eos, m, vocab.brk], image, [vocab.eos, m]]).astype(np.int32)


def scored_caption(vocab: Vocab, image, caption) -> tuple[np.ndarray, int]:
    """(tokens, first scored position): `image_to_text` then the caption and `<eoss>`; the
    caption's log-likelihood is over tokens[first:] (the caption and its closing token)."""
    prompt = image_to_text(vocab, image)
    caption = _check(vocab, caption, "text", "candidate caption")
    return np.concatenate([prompt, caption, [vocab.eoss]]).astype(np.int32), len(prompt)


def scored_image(vocab: Vocab, caption, image, retrieved=()) -> tuple[np.ndarray, int]:
    """(tokens, first scored position): the text -> image prompt (with `retrieved` documents
    in front, as generation puts them) then the image; scored over the image's tokens."""
    prompt, _ = text_to_image(vocab, caption)
    if len(retrieved):
        prompt = with_retrieved(vocab, prompt, retrieved)
    image = _check(vocab, image, "image", "scored image")
    return np.concatenate([prompt, image]).astype(np.int32), len(prompt)


def infill(vocab: Vocab, before, after) -> np.ndarray:
    before = _check(vocab, before, "text", "text before the gap")
    after = _check(vocab, after, "text", "text after the gap")
    m = vocab.sentinel(0)
    return np.concatenate([[vocab.eos], before, [m], after, [vocab.eos, m]]).astype(np.int32)


def text_answer(vocab: Vocab, tokens) -> np.ndarray:
    """Generated text-mode tokens -> the text ids before the first stop or special id."""
    a = np.asarray(tokens)
    stop = np.flatnonzero(~np.asarray(vocab.is_text(a)))
    return a[:stop[0]] if stop.size else a
