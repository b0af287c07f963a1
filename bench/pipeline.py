"""Tokens per second the input pipeline delivers to one process.

    python bench/pipeline.py [--docs 3000] [--seconds 10] [--workers 0 1 2] [--profile]
                             [section.key=value ...]

Writes a prepared directory of 256x256-like documents (1024 image tokens, a 10-40 token
caption, 256x256x3 pixels of a few flat rectangles, as `prepare` stores them) and a random
k = 3 neighbors table to a temporary directory, then runs the real pipeline
(`data/pipeline.py`) with the cm3leon_350m vocabulary, seq 4096, k = 2, lambda = 1,
8 rows per batch, for each worker count. Reports real (non-padding) tokens per second,
row fill and truncation. `--profile` runs cProfile over 300 examples made in this thread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.data import pipeline  # noqa: E402
from cm3leon_jax.data.records import write_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def documents(vocab, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.full((256, 256, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 200, 2)
            pixels[y:y + 56, x:x + 56] = rng.integers(0, 256, 3)
        yield {"id": f"bench-{i}", "caption": "bench",
               "text": vocab.text_ids(rng.integers(0, vocab.text_size, rng.integers(10, 41))),
               "image": vocab.image_ids(rng.integers(0, vocab.image_size, 1024)),
               "pixels": pixels}


def prepare(root: Path, cfg, n: int) -> None:
    vocab = cfg.vocab.build()
    shards = 4
    docs = list(documents(vocab, n))
    write_documents(root, [docs[s::shards] for s in range(shards)])
    vocab.save(root / "vocab.json")
    (root / "retrieval").mkdir()
    np.save(root / "retrieval" / "neighbors.npy",
            np.random.default_rng(1).integers(0, n, (n, 3)))


def run(cfg, seconds: float) -> dict:
    it = pipeline.batches(cfg, log=lambda _: None)
    try:
        t0 = time.perf_counter()
        next(it)  # start-up (worker spawn) and the first packing round
        startup = time.perf_counter() - t0
        real = rows = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b = next(it)
            real += int((b["segment_ids"] > 0).sum())
            rows += b["segment_ids"].shape[0]
        elapsed = time.perf_counter() - t0
    finally:
        if cfg.data.workers:
            it.close()
    return {"workers": cfg.data.workers, "startup_s": startup, "tokens_per_s": real / elapsed,
            "rows_per_s": rows / elapsed, "fill": real / (rows * cfg.data.seq_len)}


def truncation(cfg, n: int = 200) -> float:
    ex = pipeline.examples(cfg)
    made = [ex[i] for i in range(n)]
    cut = sum(e["truncated"] for e in made)
    return cut / (cut + sum(e["inputs"].size + 1 for e in made))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--profile", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = ["train.batch_size=8", "data.seq_len=4096", "data.k=2", f"data.dir={root}",
                *args.overrides]
        cfg = load_config(ROOT / "configs" / "cm3leon_350m.yaml", base)
        t0 = time.perf_counter()
        prepare(root, cfg, args.docs)
        size = sum(f.stat().st_size for f in (root / "documents").iterdir())
        print(f"prepared {args.docs} documents ({size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f}s; truncated {truncation(cfg):.1%} of tokens")
        print(f"{'workers':>8} {'start-up':>9} {'tokens/s':>12} {'rows/s':>8} {'fill':>6}")
        for w in args.workers:
            r = run(load_config(ROOT / "configs" / "cm3leon_350m.yaml",
                                base + [f"data.workers={w}"]), args.seconds)
            print(f"{r['workers']:>8} {r['startup_s']:>8.1f}s {r['tokens_per_s']:>12,.0f} "
                  f"{r['rows_per_s']:>8.1f} {r['fill']:>6.2f}")
        if args.profile:  # the example map, in this thread (grain runs it in its threads)
            ex = pipeline.examples(cfg)
            prof = cProfile.Profile()
            prof.enable()
            for i in range(300):
                ex[i]
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)

if __name__ == "__main__":
    main()
