"""The unified vocabulary: the one place that knows every token id.

Layout (CM3Leon / metaseq, see DESIGN.md):

    0 <pad> | 1 <eos> | 2 <break> | 3 <eoss> | 4 <unk> | <mask:0> .. <mask:S-1>
    | text ids (the sentencepiece model's ids, shifted) | image codes (the VQ codebook, shifted)
    | padding up to a multiple of 128 (never produced, never a target)

Padding the table to a multiple of 128 keeps the embedding and the logits matmul aligned
for the MXU/tensor cores and divisible by any reasonable `tensor` mesh size.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from cm3leon_jax import storage

SPECIALS = ("<pad>", "<eos>", "<break>", "<eoss>", "<unk>")
PAD, EOS, BREAK, EOSS, UNK = range(len(SPECIALS))
ALIGN = 128


@dataclasses.dataclass(frozen=True)
class Vocab:
    text_size: int
    image_size: int
    num_sentinels: int = 512

    def __post_init__(self):
        for name in ("text_size", "image_size", "num_sentinels"):
            if getattr(self, name) < 1:
                raise ValueError(f"vocab.{name} must be >= 1, got {getattr(self, name)}")

    # --- id ranges ---------------------------------------------------------------
    pad, eos, brk, eoss, unk = PAD, EOS, BREAK, EOSS, UNK

    @property
    def sentinel_offset(self) -> int:
        return len(SPECIALS)

    @property
    def text_offset(self) -> int:
        return self.sentinel_offset + self.num_sentinels

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_size

    @property
    def used_size(self) -> int:
        return self.image_offset + self.image_size

    @property
    def size(self) -> int:
        """Rows of the embedding table: `used_size` rounded up to a multiple of 128."""
        return -(-self.used_size // ALIGN) * ALIGN

    # --- conversions -------------------------------------------------------------
    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} outside [0, {self.num_sentinels})")
        return self.sentinel_offset + i

    def text_ids(self, piece_ids) -> np.ndarray:
        """Sentencepiece ids -> vocabulary ids."""
        a = np.asarray(piece_ids, np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.text_size):
            raise ValueError(f"text piece id outside [0, {self.text_size})")
        return (a + self.text_offset).astype(np.int32)

    def image_ids(self, codes) -> np.ndarray:
        """VQ codebook indices -> vocabulary ids."""
        a = np.asarray(codes, np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.image_size):
            raise ValueError(f"image code outside [0, {self.image_size})")
        return (a + self.image_offset).astype(np.int32)

    def to_piece_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if not self.is_text(a).all():
            raise ValueError("not all ids are text ids")
        return a - self.text_offset

    def to_codes(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if not self.is_image(a).all():
            raise ValueError("not all ids are image ids")
        return a - self.image_offset

    # --- predicates (work on numpy and jax arrays alike) ---------------------------
    def is_special(self, ids):
        return ids < self.sentinel_offset

    def is_sentinel(self, ids):
        return (ids >= self.sentinel_offset) & (ids < self.text_offset)

    def is_text(self, ids):
        return (ids >= self.text_offset) & (ids < self.image_offset)

    def is_image(self, ids):
        return (ids >= self.image_offset) & (ids < self.used_size)

    def token_name(self, i: int) -> str:
        if i < self.sentinel_offset:
            return SPECIALS[i]
        if i < self.text_offset:
            return f"<mask:{i - self.sentinel_offset}>"
        if i < self.image_offset:
            return f"<text:{i - self.text_offset}>"
        if i < self.used_size:
            return f"<image:{i - self.image_offset}>"
        return "<unused>"

    def check_tokenizers(self, text_pieces: int, codebook_size: int) -> None:
        """Every sentencepiece piece and every codebook entry must have an id here.

        The text range may be larger than the model (sentencepiece stops early on a small
        corpus; the spare ids are never produced); the image range must equal the codebook.
        """
        if text_pieces > self.text_size:
            raise ValueError(f"the text tokenizer has {text_pieces} pieces but vocab.text_size "
                             f"is {self.text_size}")
        if codebook_size != self.image_size:
            raise ValueError(f"the image tokenizer has {codebook_size} codes but "
                             f"vocab.image_size is {self.image_size}")

    # --- persistence -------------------------------------------------------------
    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "specials": list(SPECIALS), "size": self.size}

    def save(self, path: storage.PathLike, **info) -> None:
        """Write vocab.json; `info` (e.g. the tokenizer files it was built for) rides along."""
        storage.path(path).write_text(json.dumps({**self.to_json(), **info}, indent=2) + "\n")

    @classmethod
    def load(cls, path: storage.PathLike) -> "Vocab":
        d = json.loads(storage.path(path).read_text())
        if tuple(d.get("specials", SPECIALS)) != SPECIALS:
            raise ValueError(f"{path}: special tokens {d['specials']} differ from {list(SPECIALS)}")
        return cls(d["text_size"], d["image_size"], d["num_sentinels"])
