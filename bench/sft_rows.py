"""Time the SFT training rows (sft/rows.py): rows per second from one thread.

    python bench/sft_rows.py --config configs/sft_tiny.yaml --rows 40 sft.tokenizers=DIR [section.key=value ...]

Each row draws, renders, tokenizes (sentencepiece + VQ-GAN encoder) and packs mixture
examples; the first row (encoder compile) is timed apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.sft.rows import sft_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    rows = sft_rows(cfg)
    t0 = time.perf_counter()
    rows(0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    examples = filled = 0
    for r in range(1, args.rows + 1):
        row = rows(r)
        examples += int(row["segment_ids"].max())
        filled += int((row["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    print(f"first row {first:.2f}s; {args.rows} rows in {dt:.2f}s: {args.rows / dt:.1f} rows/s, "
          f"{examples / args.rows:.2f} examples/row, {filled / args.rows / cfg.data.seq_len:.0%} "
          f"of each row filled (loss={cfg.sft.loss})")


if __name__ == "__main__":
    main()
