"""The retrieval encoder `retrieval.encoder` names: the built-in dual encoder (trained by
`cm3leon retrieval train-encoder`), MiniLM (text only, weights from a package), CLIP (the
paper's frozen retriever, a transformers CLIPModel directory), or none for `npy` (vectors
computed elsewhere are read, not computed; retrieval/embed.py)."""

from __future__ import annotations

import hashlib

import numpy as np

from cm3leon_jax import storage
from cm3leon_jax.config import RetrievalConfig
from cm3leon_jax.layout import RetrievalDir
from cm3leon_jax.perception import clip as clip_lib
from cm3leon_jax.retrieval.minilm import MiniLM
from cm3leon_jax.retrieval.train_encoder import load_encoder


class ClipEncoder:
    """CLIP behind the encoder interface of retrieval/embed.py. Text tokens are CLIP BPE
    ids without the start/end tokens, so query dropout removes words' pieces, not the
    markers; `embed_texts` frames them as the tokenizer does (truncated keeping the end)."""
    has_text, has_image = True, True

    def __init__(self, path: storage.PathLike, batch: int):
        self.clip = clip_lib.load_clip(path)
        self.batch, self.dim = batch, self.clip.projection_dim
        tok = self.clip.tokenizer
        self.bos, self.eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
        if self.bos is None or self.eos is None:
            raise ValueError(f"{path}: tokenizer.json lacks <|startoftext|> or <|endoftext|>")
        self.fingerprint = f"clip-{_digest(storage.path(path))}"

    def text_tokens(self, doc: dict) -> np.ndarray:
        ids = self.clip.tokenizer.encode(doc["caption"], add_special_tokens=False).ids
        return np.asarray(ids[:self.clip.max_length - 2], np.int32)

    def embed_texts(self, token_lists: list[np.ndarray]) -> np.ndarray:
        n, width = len(token_lists), self.clip.max_length
        ids = np.full((n, width), self.clip.pad_id, np.int32)
        mask = np.zeros((n, width), np.int32)
        for r, t in enumerate(token_lists):
            row = [self.bos, *t[:width - 2], self.eos]
            ids[r, :len(row)], mask[r, :len(row)] = row, 1
        out = []
        for s in range(0, n, self.batch):
            part_ids, part_mask = ids[s:s + self.batch], mask[s:s + self.batch]
            pad = self.batch - len(part_ids)  # one shape, one compilation
            f = clip_lib.text_features(self.clip.params, np.pad(part_ids, ((0, pad), (0, 0))),
                                       np.pad(part_mask, ((0, pad), (0, 0))), self.clip.text,
                                       self.clip.eos_token_id)
            out.append(np.asarray(f, np.float32)[:len(part_ids)])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        return clip_lib.embed_images(self.clip, pixels, self.batch)


def _digest(folder: storage.Path) -> str:
    """Of everything that changes a vector: the weights, config, tokenizer, preprocessing
    (a fine-tune of the same shape must not reuse the old one's cached vectors)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def make_encoder(cfg: RetrievalConfig, out: RetrievalDir):
    if cfg.encoder == "minilm":
        return MiniLM()
    if cfg.encoder == "builtin":
        return load_encoder(out.encoder, cfg.embed_batch)
    if cfg.encoder == "clip":
        return ClipEncoder(cfg.clip, cfg.embed_batch)
    return None
