"""Sequence assembly (CM3Leon Fig. 9, metaseq's layout): documents and training examples.

    document = caption <break> image          (or image <break> caption, Chameleon-style)
    example  = <eos> r1 <break> r2 <break> query <eos>

Pure numpy over vocabulary ids. The example also carries a per-token flag saying which
tokens belong to retrieved documents, so the loss can weight them differently.
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.vocab import Vocab


def document(text: np.ndarray, image: np.ndarray, vocab: Vocab,
             image_first: bool = False, where: str = "document") -> np.ndarray:
    """One document's tokens; a missing modality leaves the other alone, without <break>."""
    text = np.asarray(text, np.int32)
    image = np.asarray(image, np.int32)
    if text.size and not vocab.is_text(text).all():
        raise ValueError(f"{where}: field 'text' holds ids outside the text range "
                         f"[{vocab.text_offset}, {vocab.image_offset})")
    if image.size and not vocab.is_image(image).all():
        raise ValueError(f"{where}: field 'image' holds ids outside the image range "
                         f"[{vocab.image_offset}, {vocab.used_size})")
    parts = [image, text] if image_first else [text, image]
    parts = [p for p in parts if p.size]
    if not parts:
        raise ValueError(f"{where}: both 'text' and 'image' are empty")
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([parts[0], [vocab.brk], parts[1]]).astype(np.int32)


def example(query: np.ndarray, retrieved: list[np.ndarray], vocab: Vocab
            ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, is_retrieved): `<eos> r1 <break> ... rk <break> query <eos>`.

    `is_retrieved` is true from the leading `<eos>` through the `<break>` after the last
    retrieved document: the tokens whose prediction is "reproduce a retrieved document".
    """
    parts = [np.asarray([vocab.eos], np.int32)]
    for r in retrieved:
        parts += [r, np.asarray([vocab.brk], np.int32)]
    n_retrieved = sum(p.size for p in parts)
    parts += [query, np.asarray([vocab.eos], np.int32)]
    tokens = np.concatenate(parts).astype(np.int32)
    flags = np.zeros(tokens.size, bool)
    if retrieved:
        flags[:n_retrieved] = True
    return tokens, flags
