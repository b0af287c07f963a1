"""The text tokenizer: a sentencepiece model trained on the corpus captions.

Trained losslessly: no normalisation (identity rule, whitespace kept) and byte fallback,
so `decode(encode(caption)) == caption` for any UTF-8 caption; prepare checks it for every
caption it writes. The model has only `<unk>` as a control piece (id 0): `<pad>`, `<eos>`
and the sentinels live in the unified vocabulary (`cm3leon_jax.vocab`), which shifts these
piece ids into its text range. Pieces are ids [0, size); the vocabulary may reserve more
text ids than the model has (sentencepiece stops early on a small corpus), those are never
produced. The model is trained into and loaded from bytes, so it may live on cloud storage.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
import sentencepiece as spm

from cm3leon_jax import storage


class TextTokenizer:
    """A loaded sentencepiece model: caption <-> piece ids (not yet vocabulary ids)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    @classmethod
    def load(cls, path: storage.PathLike) -> "TextTokenizer":
        path = storage.path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer {path} does not exist")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None

    def save(self, path: storage.PathLike) -> None:
        with storage.staged_file(path) as tmp:
            tmp.write_bytes(self.model_proto)

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, pieces) -> str:
        """Piece ids -> text; ids the model does not have decode as `<unk>` (" ⁇ ")."""
        ids = np.asarray(pieces, np.int64).reshape(-1)
        ids = np.where((ids >= 0) & (ids < self.size), ids, self._sp.unk_id())
        return self._sp.decode(ids.tolist())

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, *,
                         model_type: str = "bpe", byte_fallback: bool = True,
                         character_coverage: float = 1.0) -> TextTokenizer:
    """Train on `captions` (in order; deterministic); at most `vocab_size` pieces."""
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("no captions to train the text tokenizer on")
    if byte_fallback and vocab_size < 300:
        raise ValueError(f"vocab.text_size={vocab_size}: byte fallback needs 256 byte pieces "
                         "plus the corpus characters; use >= 300 or text_tokenizer.byte_fallback=false")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, hard_vocab_limit=False, byte_fallback=byte_fallback,
        character_coverage=character_coverage, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=-1, eos_id=-1,
        pad_id=-1, input_sentence_size=0, max_sentence_length=1 << 16, num_threads=1,
        minloglevel=2)
    return TextTokenizer(model.getvalue())
