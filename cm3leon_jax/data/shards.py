"""The shard stage of `cm3leon prepare`, shared by its runners (the local one in
prepare.py, Apache Beam in beam_shards.py): which source records go into which shard, in
which chunks they are read and encoded, and how one shard is written. Both runners call
`write_one_shard` on the same chunks, so they write the same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time

import numpy as np

from cm3leon_jax import storage
from cm3leon_jax.data.records import shard_name, write_shard
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import Path
from cm3leon_jax.vocab import Vocab

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which source records go into which shard, and in which chunks they are read and
    encoded: the same for every runner, so every runner writes the same bytes."""
    root: str
    n_shards: int
    shard_size: int
    total: int
    batch_size: int

    def path(self, i: int) -> Path:
        return DataDir(self.root).documents / shard_name(i, self.n_shards)

    def records(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.total)

    def chunks(self, i: int) -> list[tuple[int, int]]:
        lo, hi = self.records(i)
        return [(s, min(s + self.batch_size, hi)) for s in range(lo, hi, self.batch_size)]


def write_one_shard(plan: ShardPlan, i: int, results, image, vocab: Vocab, seconds, bar) -> dict:
    """Shard `i` from `results` (read_chunk outputs of `plan.chunks(i)`, in order): the
    documents, then its counts file, which marks it done; returns the counts."""
    lo, hi = plan.records(i)
    shard = {"documents": 0, "skipped": collections.Counter(), "skipped_records": []}
    write_shard(plan.path(i), shard_documents(results, hi - lo, image, vocab, shard, seconds,
                                               bar))
    storage.write_text_atomic(plan.path(i).with_suffix(".json"), json.dumps(shard) + "\n")
    return shard


def shard_documents(results, count: int, image, vocab: Vocab, shard: dict, seconds, bar):
    """The next `count` records from the readers as documents, images encoded per chunk."""
    done = 0
    while done < count:
        t0 = time.perf_counter()
        items, chunk_seconds = next(results)
        seconds["wait"] += time.perf_counter() - t0
        done += len(items)
        seconds.update(chunk_seconds)
        good = [d for d in items if isinstance(d, dict)]
        for record_id, reason, detail in (d for d in items if not isinstance(d, dict)):
            log.warning("skipped %s: %s %s", record_id, reason, detail)
            shard["skipped"][reason] += 1
            shard["skipped_records"].append([record_id, reason, detail])
        if good:
            t0 = time.perf_counter()
            codes = image.encode(np.stack([d["pixels"] for d in good]))
            seconds["image"] += time.perf_counter() - t0
            for d, c in zip(good, codes):
                shard["documents"] += 1
                t0 = time.perf_counter()
                yield {"id": d["id"], "caption": d["caption"], "text": vocab.text_ids(d["pieces"]),
                       "image": vocab.image_ids(c), "pixels": d["pixels"], "meta": d["meta"]}
                seconds["write"] += time.perf_counter() - t0  # the writer's time on it
        if bar is not None:
            bar.update(len(items))
