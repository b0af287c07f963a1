"""The retrieval encoder `retrieval.encoder` names: the built-in dual encoder (trained by
`cm3leon retrieval train-encoder`), MiniLM (text only, weights from a package), or none for
`npy` (vectors computed elsewhere are read, not computed; retrieval/embed.py)."""

from __future__ import annotations

from cm3leon_jax.config import RetrievalConfig
from cm3leon_jax.layout import RetrievalDir
from cm3leon_jax.retrieval.minilm import MiniLM
from cm3leon_jax.retrieval.train_encoder import load_encoder


def make_encoder(cfg: RetrievalConfig, out: RetrievalDir):
    if cfg.encoder == "minilm":
        return MiniLM()
    if cfg.encoder == "builtin":
        return load_encoder(out.encoder, cfg.embed_batch)
    return None
