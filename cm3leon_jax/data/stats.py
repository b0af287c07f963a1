"""`cm3leon data-stats`: what the training input is, measured on the real pipeline.

The examples and rows come from `data/pipeline.py` exactly as training reads them: the
prepared `data.dir`, or (without one) synthetic documents at the config's shapes — captions
of ~20 tokens, the image tokenizer's tokens per image, retrieval pools of other documents —
written as a prepared directory in a temporary folder. Reported:

    whole_caption_masked / whole_image_masked  share of examples whose query caption / image
                                               is one masked span (the CFG unconditional
                                               stream and captioning-by-infilling layout)
    row_fill             real tokens / row slots of the packed rows
    real_tokens_per_step row_fill x train.batch_size x data.seq_len
    retrieved_k, spans   histograms over the examples
    truncated            share of examples cut to fit a row
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cm3leon_jax.config import Config
from cm3leon_jax.data import pipeline
from cm3leon_jax.data.records import write_documents
from cm3leon_jax.data.synthetic import synthetic_documents, synthetic_pools
from cm3leon_jax.layout import DataDir, RetrievalDir


def write_synthetic(cfg: Config, out: Path, documents: int, pool: int) -> Config:
    """A prepared directory of synthetic documents at the config's shapes; returns the
    config pointed at it (its own retrieval table)."""
    vocab, d = cfg.vocab.build(), DataDir(out)
    write_documents(out, [synthetic_documents(vocab, documents, cfg.vqgan.tokens_per_image,
                                              cfg.data.seed)])
    vocab.save(d.vocab)
    retrieval = RetrievalDir(d.retrieval)
    retrieval.root.mkdir(parents=True)
    np.save(retrieval.neighbors, synthetic_pools(documents, pool, cfg.data.seed))
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, dir=str(out), workers=0),
        retrieval=dataclasses.replace(cfg.retrieval, dir=None))


def histogram(values) -> dict[int, int]:
    return dict(sorted(collections.Counter(int(v) for v in values).items()))


def measure(cfg: Config, examples: int, progress: bool = True) -> dict:
    """The statistics of the first `examples` examples and of the rows that hold them."""
    made = pipeline.examples(cfg)
    facts = [made[i] for i in tqdm(range(examples), desc="examples", disable=not progress)]
    tokens = sum(int(f["inputs"].size) for f in facts)
    rows = pipeline.batches(cfg, log=lambda *_: None)
    slots = real = 0
    with tqdm(total=tokens, desc="rows", unit="token", disable=not progress) as bar:
        while real < tokens or not slots:
            seg = next(rows)["segment_ids"]
            slots, real = slots + seg.size, real + int((seg > 0).sum())
            bar.update(int((seg > 0).sum()))
    fill = real / slots
    return {
        "data": cfg.data.dir, "examples": examples, "packing": cfg.data.packing,
        "seq_len": cfg.data.seq_len, "tokens_per_example": round(tokens / examples, 1),
        "whole_caption_masked": round(float(np.mean([f["caption_whole"] for f in facts])), 4),
        "whole_image_masked": round(float(np.mean([f["image_whole"] for f in facts])), 4),
        "row_fill": round(fill, 4),
        "real_tokens_per_step": round(fill * cfg.train.batch_size * cfg.data.seq_len),
        "retrieved_k": histogram(f["retrieved"] for f in facts),
        "spans": histogram(f["spans"] for f in facts),
        "truncated": round(float(np.mean([f["truncated"] > 0 for f in facts])), 4),
    }


def data_stats(cfg: Config, examples: int, progress: bool = True) -> dict:
    """`measure` on `data.dir`, or on synthetic documents at the config's shapes."""
    if cfg.data.dir is not None:
        return measure(cfg, examples, progress)
    with tempfile.TemporaryDirectory() as tmp:
        pool = len(cfg.retrieval.lists()) * cfg.retrieval.pool  # a row of the neighbors table
        synthetic = write_synthetic(cfg, Path(tmp) / "data", max(examples, 64), pool)
        stats = measure(synthetic, examples, progress)
    return {**stats, "data": "synthetic"}
