"""Validation loss on a fixed held-out set: the same loss sums as the train step
(train/step.py `loss_sums`), summed over every held-out batch, text and image apart; a
trainer loop calls it on the live parameters (`train.eval_every`, and the scaling sweep's
evaluations).

Held-out rows: with the synthetic source, rows from an index range training never reaches
(training reads rows below 2^40); with prepared data, the first batches of `train.eval_dir`
(another prepared directory) through the same grain pipeline. Either way the set is fixed by
the config, identical for every size and every evaluation.
"""

from __future__ import annotations

import dataclasses
import jax
import numpy as np

from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.data import pipeline
from cm3leon_jax.data.synthetic import synthetic_row
from cm3leon_jax.layout import DataDir
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train.state import model_def
from cm3leon_jax.train.step import BATCH_KEYS, loss_sums

HELDOUT_FIRST_ROW = 2**41  # synthetic rows from here on are never trained on


def heldout_batches(cfg: Config, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """This process's share of each of the `train.eval_batches` held-out batches."""
    n, batch = cfg.train.eval_batches, cfg.train.batch_size
    if cfg.data.dir is not None:
        if not DataDir(cfg.train.eval_dir).documents.is_dir():
            raise ConfigError(f"train.eval_dir={cfg.train.eval_dir!r} is not a prepared "
                              "directory (`cm3leon prepare` of held-out documents)")
        data = dataclasses.replace(cfg.data, dir=cfg.train.eval_dir, workers=0)
        own = dataclasses.replace(cfg.retrieval, dir=None)  # the held-out set's own neighbors
        it = pipeline.batches(dataclasses.replace(cfg, data=data, retrieval=own), process_index,
                              process_count)
        return [next(it) for _ in range(n)]
    local = batch // process_count
    vocab = cfg.vocab.build()
    out = []
    for b in range(n):
        first = HELDOUT_FIRST_ROW + b * batch + process_index * local
        rows = [synthetic_row(first + i, cfg.data.seed, cfg.data.seq_len, vocab)
                for i in range(local)]
        out.append({k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS})
    return out


def losses_from_sums(sums: dict) -> dict:
    """Mean losses; a modality's loss is None when the held-out set has none of its tokens."""
    out = {"loss": sums["ce"] / max(sums["w"], 1.0)}
    for kind in ("text", "image"):
        w = sums[f"{kind}_w"]
        out[f"{kind}_loss"] = sums[f"{kind}_ce"] / w if w > 0 else None
    out["text_tokens"], out["image_tokens"] = int(sums["text_w"]), int(sums["image_w"])
    return out


class Evaluator:
    """Measures the held-out losses of parameters laid out on the config's mesh."""

    def __init__(self, cfg: Config, batches: list[dict], devices=None):
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        mdef = model_def(cfg)
        vocab, chunk = cfg.vocab.build(), cfg.model.logits_chunk
        self.batches, self.micro = batches, cfg.train.grad_accum
        self.fn = jax.jit(lambda params, batch: loss_sums(mdef.bind(params), batch, vocab, chunk))

    def __call__(self, params: dict) -> dict:
        totals: dict[str, float] = {}
        with jax.set_mesh(self.mesh):
            for local in self.batches:
                for micro in _split(local, self.micro):  # the train step's memory, no more
                    sums = jax.device_get(self.fn(params,
                                                  mesh_lib.global_batch(micro, self.mesh)))
                    for k, v in sums.items():
                        totals[k] = totals.get(k, 0.0) + float(v)
        return losses_from_sums(totals)


def _split(local: dict, parts: int) -> list[dict]:
    """A process's batch as `parts` micro-batches (train.grad_accum), rows in order."""
    rows = len(next(iter(local.values())))
    size = rows // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(parts)]
