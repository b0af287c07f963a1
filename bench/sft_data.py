"""Synthetic SFT suite throughput: examples per second per task (scene, pixels, maps), no
tokenizers. Usage: python bench/sft_data.py [--resolution 64] [--n 500]"""

import argparse
import time

from cm3leon_jax.sft.shapes_suite import ShapesSFT
from cm3leon_jax.sft.tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    suite = ShapesSFT(seed=0, resolution=args.resolution)
    for task in TASKS:
        t0 = time.perf_counter()
        for i in range(args.n):
            suite.example(task, "train", i)
        dt = time.perf_counter() - t0
        print(f"{task:<10} {args.n / dt:8.0f} examples/s at {args.resolution} px ({args.n} in {dt:.2f}s)")


if __name__ == "__main__":
    main()
