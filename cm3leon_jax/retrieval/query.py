"""Retrieval at inference: the memory bank's best documents for new captions.

A caption is embedded by the text tower of the index's encoder (a text-only query, so its
vector is the unit text embedding, CM3Leon §2.1) and searched in the index that
`cm3leon index` built. Of the top `retrieval.candidates` hits, the documents are chosen by
the heuristics of the offline neighbors that training reads (neighbors.select): never two
copies of one document or of one image, documents with both modalities first. (A text-only
query is never a duplicate of a bank document, so same-caption documents stay, as in
training.) They come back as document token ids, ready to be put in front of a generation
prompt (`generate.prompts.with_retrieved`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from cm3leon_jax import storage
from cm3leon_jax.config import Config
from cm3leon_jax.data import records, sequences
from cm3leon_jax.layout import bank_dir, retrieval_dir
from cm3leon_jax.retrieval import embed, index, neighbors
from cm3leon_jax.retrieval.encoders import make_encoder


class Retriever:
    """Search the run's index with captions given as text ids of the unified vocabulary."""

    def __init__(self, cfg: Config):
        r, out = cfg.retrieval, retrieval_dir(cfg)
        if r.encoder == "npy":
            raise ValueError("retrieval.encoder=npy: vectors computed elsewhere cannot embed "
                             "new captions; use the builtin or minilm encoder")
        self.encoder = make_encoder(r, out)
        built = json.loads((out.index / index.MANIFEST).read_text())["encoder_fingerprint"]
        if self.encoder.fingerprint != built:
            raise ValueError(f"{out.index}: built with encoder {built}, the encoder now is "
                             f"{self.encoder.fingerprint}; rerun `cm3leon index`")
        self.searcher = index.load_searcher(out.index)
        self.docs = records.open_documents(bank_dir(cfg))
        self.vocab = cfg.vocab.build()
        self.settings = r
        self.bank = neighbors.Sides(storage.load_npy(out.bank / "text.npy", mmap=True),
                                    storage.load_npy(out.bank / "image.npy", mmap=True))
        self.pairs = storage.load_npy(out.bank / "modalities.npy") == (embed.TEXT | embed.IMAGE)

    def _queries(self, captions: list[str], text_ids: list[np.ndarray]) -> np.ndarray:
        if len(captions) != len(text_ids):
            raise ValueError(f"{len(captions)} captions but {len(text_ids)} text id lists")
        tokens = [self.encoder.text_tokens({"text": t, "caption": c, "image": []})
                  for c, t in zip(captions, text_ids)]
        return embed.unit(self.encoder.embed_texts(tokens))

    def search(self, captions: list[str], text_ids: list[np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n, k], scores [n, k]) of the bank documents nearest each caption,
        given as its string and its text ids (an encoder reads the one it tokenizes)."""
        return index.search(self.searcher, self._queries(captions, text_ids), k)

    def choose(self, captions: list[str], text_ids: list[np.ndarray], k: int) -> np.ndarray:
        """ids int64 [n, k] (-1 where fewer): each caption's documents by the heuristics of
        the offline neighbors, from its top `retrieval.candidates` hits."""
        queries = self._queries(captions, text_ids)
        cand_ids, cand_scores = index.search(self.searcher, queries,
                                             max(k, self.settings.candidates))
        own = neighbors.Sides(queries, np.zeros((len(queries), self.bank.image.shape[1]),
                                                queries.dtype))
        ids, _, _ = neighbors.select(np.full(len(queries), -1), cand_ids, cand_scores, own,
                                     self.bank, self.pairs,
                                     dataclasses.replace(self.settings, pool=k))
        return ids

    def documents(self, captions: list[str], text_ids: list[np.ndarray],
                  k: int) -> list[list[np.ndarray]]:
        """Per caption, its k retrieved documents (`choose`) as `caption <break> image` ids."""
        ids = self.choose(captions, text_ids, k)
        out = []
        for row in ids:
            found = []
            for i in row[row >= 0]:
                doc = records.decode_document(self.docs[int(i)])
                found.append(sequences.document(doc["text"], doc["image"], self.vocab,
                                                where=f"bank document {int(i)}"))
            out.append(found)
        return out
