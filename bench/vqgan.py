"""Train the image tokenizer on shapes and report reconstruction PSNR, codebook usage, time.

    python bench/vqgan.py --config configs/tiny.yaml --workdir runs/bench_vqgan [section.key=value ...]

The run is `cm3leon tokenizer train-image` (held-out shapes scenes for the PSNR); this adds
the machine, the step rate and one JSON line for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.tokenizers.image_train import train_from_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--workdir", default="runs/bench_vqgan")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    _, s = train_from_config(cfg, args.workdir)
    v, t = cfg.vqgan, cfg.vqgan_train
    report = {**s, "steps_per_s": round(t.steps / s["train_seconds"], 3),
              "images_per_s": round(t.steps * t.batch_size / s["train_seconds"], 1),
              "tokens_per_image": v.tokens_per_image, "codebook_size": v.codebook_size,
              "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "load_avg_1m": round(os.getloadavg()[0], 1), "python": platform.python_version()}
    print(f"{v.resolution}x{v.resolution} -> {v.tokens_per_image} tokens / {v.codebook_size} "
          f"codes: held-out PSNR {s['psnr']:.2f} dB, codebook usage {s['codebook_usage']:.1%}, "
          f"{t.steps} steps x {t.batch_size} images in {s['train_seconds']:.0f}s "
          f"({report['steps_per_s']} steps/s)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
