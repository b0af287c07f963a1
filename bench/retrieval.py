"""Retrieval speed: ScaNN against exact numpy search, and the neighbor precompute rate.

    python bench/retrieval.py [--n 100000] [--dim 512] [--centres 1000] [--queries 1000]
                              [--index-shards N] [--precompute] [retrieval.key=value ...]

Data: `--centres` random unit centres; each document's text and image vectors are its
centre plus Gaussian noise (`--noise` x the centre's norm), its document vector the unit
mean of the two (the CM3Leon rule). Queries are fresh documents drawn the same way.

1. Exact search (`index.exact_search`: numpy matmul + argpartition, the whole bank) and
   the ScaNN searcher that `cm3leon index` builds for this size (tree + AH + reorder, from
   the retrieval config): queries/s of each, ScaNN's recall@10 against exact.
2. `--index-shards N`: the sharded index `cm3leon index` builds with
   `retrieval.index_shards=N` (built, serialized and loaded back through `index.py`):
   its queries/s, its recall@10 against exact search and against the single searcher's
   results (the share of the single index's top 10 the sharded index also finds).
3. `--precompute`: writes a prepared directory of N small documents with the vectors as
   npy embeddings, then runs the real `cm3leon index` and `cm3leon neighbors` code
   (encoder npy, all heuristics) and reports documents/s of the neighbor precompute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.retrieval import embed, index, neighbors  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def clustered(n: int, centres: np.ndarray, noise: float, rng) -> tuple[np.ndarray, np.ndarray]:
    g = rng.integers(0, len(centres), n)
    scale = noise / np.sqrt(centres.shape[1])
    text = centres[g] + scale * rng.standard_normal((n, centres.shape[1]), np.float32)
    image = centres[g] + scale * rng.standard_normal((n, centres.shape[1]), np.float32)
    return text.astype(np.float32), image.astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--index-shards", type=int, default=0, metavar="N",
                   help="also measure the index split into N document ranges")
    p.add_argument("--precompute", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(CONFIG, args.overrides)
    r = cfg.retrieval
    rng = np.random.default_rng(0)
    centres = embed.unit(rng.standard_normal((args.centres, args.dim)).astype(np.float32))
    text, image = clustered(args.n, centres, args.noise, rng)
    bank = embed.document_vectors(text, image)
    queries = embed.document_vectors(*clustered(args.queries, centres, args.noise, rng))

    t0 = time.perf_counter()
    truth, _ = index.exact_search(queries, bank, 10)
    exact_qps = args.queries / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    searcher = index.build_searcher(bank, r)
    build_s = time.perf_counter() - t0
    index.search(searcher, queries[:100], 10)  # warm up the thread pool
    t0 = time.perf_counter()
    found, _ = index.search(searcher, queries, 10)
    scann_qps = args.queries / (time.perf_counter() - t0)
    result = {"n": args.n, "dim": args.dim, "centres": args.centres, "noise": args.noise,
              **index.plan(args.n, r), "build_s": round(build_s, 1),
              "recall_at_10": round(index.recall_at(found, truth), 4),
              "exact_qps": round(exact_qps), "scann_qps": round(scann_qps),
              "speedup": round(scann_qps / exact_qps, 1)}
    print(json.dumps(result))

    if args.index_shards:
        if args.index_shards < 2:
            p.error("--index-shards N compares N >= 2 shards with the single index")
        sharded = load_config(CONFIG, [*args.overrides,
                                       f"retrieval.index_shards={args.index_shards}"]).retrieval
        with tempfile.TemporaryDirectory() as tmp:
            built = index.build_index(bank, tmp, sharded)
            searcher = index.load_searcher(tmp)
        index.search(searcher, queries[:100], 10)  # warm up the thread pool
        t0 = time.perf_counter()
        shard_found, _ = index.search(searcher, queries, 10)
        shard_qps = args.queries / (time.perf_counter() - t0)
        print(json.dumps({"index_shards": args.index_shards,
                          "shard_plans": [{k: v for k, v in s.items() if k != "range"}
                                          for s in built["shards"]],
                          "build_s": round(built["build_seconds"], 1),
                          "recall_at_10": round(index.recall_at(shard_found, truth), 4),
                          "recall_at_10_of_single": round(index.recall_at(shard_found, found), 4),
                          "sharded_qps": round(shard_qps)}))

    if args.precompute:
        from cm3leon_jax.data import records
        from cm3leon_jax.vocab import Vocab

        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "prep"
            vocab = Vocab(64, 64, 4)
            docs = ({"id": str(i), "caption": "", "text": vocab.text_ids([i % 64]),
                     "image": vocab.image_ids([i % 64])} for i in range(args.n))
            records.write_documents(data, [docs])
            (data / "embeddings").mkdir()
            np.save(data / "embeddings" / "text.npy", text)
            np.save(data / "embeddings" / "image.npy", image)
            run = load_config(CONFIG, [f"data.dir={data}", "retrieval.encoder=npy",
                                       "retrieval.query_text_dropout=0", *args.overrides])
            t0 = time.perf_counter()
            built = neighbors.build_bank_index(run)
            index_s = time.perf_counter() - t0
            m = neighbors.compute_neighbors(run)
            print(json.dumps({"precompute_documents": m["documents"],
                              "index_seconds": round(index_s, 1),
                              "index_recall_at_10": built["recall_at_10"],
                              "neighbors_seconds": m["seconds"],
                              "documents_per_second": m["documents_per_second"],
                              "fill": m["fill"], "k_histogram": m["k_histogram"],
                              "skipped": m["skipped"]}))


if __name__ == "__main__":
    main()
