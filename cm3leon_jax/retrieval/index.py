"""Maximum-inner-product search over the memory bank with ScaNN, and exact numpy search.

Below `exact_threshold` documents the searcher is brute force (exact); above it, a tree of
about sqrt(N) leaves + anisotropic asymmetric hashing + exact reordering of the best
`reorder` candidates (ScaNN's own rules of thumb, stack.md §B). The searcher is
serialized with ScaNN's own format (asset paths relative to its folder, so the folder may
be moved or copied) next to a manifest saying how it was built. ScaNN reads and writes
local folders only: an index on cloud storage is built in a local folder and uploaded,
and copied to this machine to load (storage.py).

With `index_shards` N > 1 the bank is split into N contiguous document ranges (even,
`shard_ranges`), each indexed by the same `build_searcher` into
`index/shard-0000i-of-0000N/`; the manifest lists the ranges. Searching a sharded index
asks every shard for its top k, offsets the ids by the shard's first document and keeps
the global top k by score, ties to the lower id (`merge`). `load_searcher` / `search` hide
the sharding from their callers. Shards are built one after another, each serialized and
released before the next, so ScaNN holds one shard's vectors and index at a time (the
bank array itself may be memory-mapped); a loaded sharded index holds every shard.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import scann

from cm3leon_jax import storage
from cm3leon_jax.config import RetrievalConfig

MANIFEST = "manifest.json"


def exact_search(queries: np.ndarray, bank: np.ndarray, k: int,
                 block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product, best first: ids int64 [Q, k], scores float32 [Q, k]."""
    k = min(k, len(bank))
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), block):
        sims = queries[s:s + block] @ bank.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(bank) else \
            np.broadcast_to(np.arange(len(bank)), (len(sims), k))
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        ids[s:s + block] = np.take_along_axis(top, order, axis=1)
        scores[s:s + block] = np.take_along_axis(top_scores, order, axis=1)
    return ids, scores


def plan(n: int, cfg: RetrievalConfig) -> dict:
    """How a bank of n documents is searched (recorded in the manifest)."""
    if n < cfg.exact_threshold:
        return {"kind": "exact"}
    leaves = cfg.num_leaves or max(1, round(math.sqrt(n)))
    return {"kind": "tree_ah", "num_leaves": leaves,
            "leaves_to_search": min(cfg.leaves_to_search, leaves), "reorder": cfg.reorder}


def build_searcher(bank: np.ndarray, cfg: RetrievalConfig, k: int = 10):
    """A ScaNN searcher over float32 [N, D] rows (inner product), built per `plan`."""
    bank = np.ascontiguousarray(bank, np.float32)
    p = plan(len(bank), cfg)
    builder = scann.scann_ops_pybind.builder(bank, k, "dot_product")
    if p["kind"] == "exact":
        return builder.score_brute_force().build()
    return (builder.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["leaves_to_search"],
                         training_sample_size=len(bank), spherical=True)
            .score_ah(2, anisotropic_quantization_threshold=0.2)
            .reorder(max(p["reorder"], k))
            .build())


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """The even, contiguous document ranges [lo, hi) of n documents in `shards` shards."""
    return [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]


def shard_dir(index_dir: storage.PathLike, shard: int, shards: int) -> storage.Path:
    return storage.path(index_dir) / f"shard-{shard:05d}-of-{shards:05d}"


def shard_count(manifest: dict) -> int:
    """How many shards the index of this manifest has (1: a single searcher)."""
    return len(manifest.get("shards", [None]))


class ShardedSearcher:
    """Searchers over contiguous document ranges, searched as one (`search`)."""

    def __init__(self, searchers: list, starts: list[int]):
        self.searchers, self.starts = searchers, starts


def merge(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each row of candidates [Q, C] (global ids, -1 / -inf: none), by score,
    ties to the lower id, so the result does not depend on the order shards answer in."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def search(searcher, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids int64 (-1 where the bank has fewer) and float32 scores, best first."""
    if isinstance(searcher, ShardedSearcher):
        return _merged([_offset(search(s, queries, k), start)
                        for s, start in zip(searcher.searchers, searcher.starts)], k)
    queries = np.ascontiguousarray(queries, np.float32)
    ids, scores = searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                   batch_size=256)
    out_ids = np.full((len(queries), k), -1, np.int64)
    out_scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.isfinite(scores)  # ScaNN pads with id 0 and NaN when the bank has < k
    out_ids[:, :ids.shape[1]] = np.where(found, ids.astype(np.int64), -1)
    out_scores[:, :ids.shape[1]] = np.where(found, scores, -np.inf)
    return out_ids, out_scores


def _offset(found: tuple[np.ndarray, np.ndarray], start: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's results with bank ids (its ids count from its first document)."""
    ids, scores = found
    return np.where(ids >= 0, ids + start, -1), scores


def _merged(results: list[tuple[np.ndarray, np.ndarray]],
            k: int) -> tuple[np.ndarray, np.ndarray]:
    return merge(np.concatenate([r[0] for r in results], axis=1),
                 np.concatenate([r[1] for r in results], axis=1), k)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k ids that the search found."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def recall_with_ties(queries: np.ndarray, bank: np.ndarray, found: np.ndarray,
                     truth_scores: np.ndarray) -> float:
    """Like `recall_at`, but a found id whose exact score ties the k-th true score counts:
    banks with duplicate vectors have many equally correct top-k lists."""
    k = truth_scores.shape[1]
    found = found[:, :k]
    exact = np.einsum("qd,qkd->qk", queries, bank[np.maximum(found, 0)])
    hits = (found >= 0) & (exact >= truth_scores[:, -1:] - 1e-5)
    return float(hits.sum() / truth_scores.size)


def build_index(bank: np.ndarray, out_dir: storage.PathLike, cfg: RetrievalConfig,
                extra: dict | None = None) -> dict:
    """Build, serialize and measure the searcher, or `cfg.index_shards` searchers one at a
    time (recall@10 of bank rows as queries, ties with the 10th exact score counted);
    returns (and writes) its manifest."""
    out_dir = storage.path(out_dir)
    if cfg.index_shards > len(bank):
        raise ValueError(f"retrieval.index_shards={cfg.index_shards} exceeds the bank's "
                         f"{len(bank)} documents")
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a failed build leaves nothing loadable
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(bank), min(cfg.recall_queries, len(bank)), replace=False)
    queries = bank[np.sort(sample)]
    ranges = shard_ranges(len(bank), cfg.index_shards)
    build_s, found, shards = 0.0, [], []
    for i, (lo, hi) in enumerate(ranges):
        t0 = time.perf_counter()
        searcher = build_searcher(bank[lo:hi], cfg)
        build_s += time.perf_counter() - t0
        where = out_dir if len(ranges) == 1 else shard_dir(out_dir, i, len(ranges))
        with storage.staged_dir(where) as local:
            searcher.serialize(str(local), relative_path=True)
        found.append(_offset(search(searcher, queries, 10), lo))
        shards.append({"range": [lo, hi], **plan(hi - lo, cfg)})
        del searcher  # the next shard is built without this one in memory
    found_ids, _ = _merged(found, 10)
    _, truth_scores = exact_search(queries, bank, 10)
    how = plan(len(bank), cfg) if len(ranges) == 1 else {"kind": "sharded", "shards": shards}
    manifest = {**how, "size": int(len(bank)), "dim": int(bank.shape[1]),
                "build_seconds": round(build_s, 2),
                "recall_at_10": round(recall_with_ties(queries, bank, found_ids, truth_scores), 4),
                "recall_queries": int(len(sample)), **(extra or {})}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_searcher(index_dir: storage.PathLike):
    """The index's searcher: a ScaNN searcher, or a `ShardedSearcher` over its shards."""
    index_dir = storage.path(index_dir)
    if not (index_dir / MANIFEST).exists():
        raise FileNotFoundError(f"{index_dir}: no index here (run `cm3leon index` first)")
    manifest = json.loads((index_dir / MANIFEST).read_text())
    if "shards" not in manifest:
        return _load_one(index_dir)
    n = len(manifest["shards"])
    return ShardedSearcher([_load_one(shard_dir(index_dir, i, n)) for i in range(n)],
                           [s["range"][0] for s in manifest["shards"]])


def _load_one(index_dir: storage.Path):
    with storage.local_copy(index_dir) as local:  # the searcher holds its assets in memory
        return scann.scann_ops_pybind.load_searcher(str(local))
