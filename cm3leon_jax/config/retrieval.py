"""Section `retrieval`: the encoder, the ScaNN index over the memory bank, the offline
neighbors and their heuristics, and the built-in dual encoder's training."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from cm3leon_jax.config.loader import ConfigError


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    dir: Optional[str] = None  # encoder, index, neighbors.npy (read by training); null: <data.dir>/retrieval
    bank: Optional[str] = None  # memory-bank prepared directory; null: data.dir itself
    encoder: Literal["builtin", "minilm", "clip", "npy"] = "builtin"  # what embeds documents
    clip: Optional[str] = None  # encoder=clip: a CLIPModel directory (save_pretrained + tokenizer)
    embeddings: str = "embeddings"  # npy encoder: <prepared dir>/<this>/{text,image}.npy
    embed_batch: int = 256  # documents per encoder call
    exact_threshold: int = 20000  # banks smaller than this are searched exactly
    num_leaves: int = 0  # ScaNN tree leaves; 0: about sqrt(bank size)
    leaves_to_search: int = 32  # ScaNN leaves searched per query
    reorder: int = 100  # candidates rescored exactly after asymmetric hashing
    index_shards: int = 1  # ScaNN indexes over even, contiguous bank ranges, searched as one
    recall_queries: int = 1000  # sample size for the index's recall@10 report
    pool: int = 4  # neighbors kept per query list; training draws data.k of a row per read
    candidates: int = 32  # top candidates searched per query before the heuristics
    query: Literal["split", "text", "image", "both"] = "split"  # split: text- and image-query lists
    query_text_dropout: float = 0.2  # fraction of the query's text tokens dropped
    max_text_score: float = 0.9  # duplicates: texts above this (and images above the next)
    max_image_score: float = 0.99  # the same image: image sides scoring above this
    prefer_pairs: bool = True  # documents with both modalities before single-modality ones
    min_fill: float = 0.9  # `cm3leon neighbors` warns when fewer documents have data.k neighbors
    seed: int = 0  # query dropout
    # the built-in dual encoder
    embed_dim: int = 128  # embedding width
    width: int = 128  # tower width
    text_layers: int = 2  # text tower blocks
    train_steps: int = 1000  # contrastive training updates
    train_batch_size: int = 64  # pairs per update (in-batch negatives)
    train_lr: float = 1e-3  # Adam learning rate
    temperature: float = 0.05  # InfoNCE temperature
    train_text_dropout: float = 0.2  # half the training texts lose this fraction of tokens

    def lists(self) -> tuple[str, ...]:
        """The query of each candidate list, in the order of the neighbors table's blocks."""
        return ("text", "image") if self.query == "split" else (self.query,)

    def check(self) -> None:
        for key in ("embed_batch", "exact_threshold", "leaves_to_search", "reorder",
                    "recall_queries", "pool", "candidates", "embed_dim", "width", "train_steps",
                    "train_batch_size", "train_lr", "temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"retrieval.{key}={getattr(self, key)} must be > 0")
        if self.index_shards < 1:
            raise ConfigError(f"retrieval.index_shards={self.index_shards} must be >= 1 (1: one "
                              "index over the whole bank)")
        for key in ("num_leaves", "text_layers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"retrieval.{key}={getattr(self, key)} must be >= 0")
        if self.candidates < self.pool:
            raise ConfigError(f"retrieval.candidates={self.candidates} is below "
                              f"retrieval.pool={self.pool}")
        if self.candidates > self.reorder:
            raise ConfigError(f"retrieval.candidates={self.candidates} exceeds retrieval.reorder="
                              f"{self.reorder} (the candidates must come out of the exact "
                              "rescoring)")
        if self.reorder < 10:
            raise ConfigError(f"retrieval.reorder={self.reorder} must be >= 10 (recall@10 is "
                              "reported)")
        for key in ("query_text_dropout", "train_text_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"retrieval.{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.min_fill <= 1:
            raise ConfigError(f"retrieval.min_fill={self.min_fill} must be a share in [0, 1]")
        for key in ("max_text_score", "max_image_score"):
            if not -1 <= getattr(self, key) <= 1:
                raise ConfigError(f"retrieval.{key}={getattr(self, key)} must be a cosine in "
                                  "[-1, 1]")
        if self.encoder == "minilm" and self.query in ("image", "split"):
            raise ConfigError(f"retrieval.query={self.query} needs an image encoder; "
                              "retrieval.encoder=minilm embeds text only: set "
                              "retrieval.query=text")
        if (self.encoder == "clip") != (self.clip is not None):
            raise ConfigError(
                f"retrieval.encoder={self.encoder} with retrieval.clip={self.clip!r}: the "
                "paper's retriever is `retrieval.encoder: clip` with `retrieval.clip: DIR` (a "
                "transformers CLIPModel directory); set both or neither")
        if self.encoder == "npy" and self.query_text_dropout and self.query != "image":
            raise ConfigError("retrieval.encoder=npy reads precomputed vectors and cannot drop "
                              "query tokens: set retrieval.query_text_dropout=0")
        if not self.embeddings or "/" in self.embeddings:
            raise ConfigError(f"retrieval.embeddings={self.embeddings!r} must be one directory "
                              "name")
        if self.train_batch_size < 2:
            raise ConfigError("retrieval.train_batch_size must be >= 2 (contrastive negatives)")
