"""Throughput of `cm3leon prepare` per stage, and a check that the shards decode back.

    python bench/prepare.py --config configs/tiny.yaml --out runs/prep_shapes \\
        source.kind=shapes source.size=10000 [section.key=value ...]

Runs the real prepare (parallel readers, the configured or given image tokenizer) into a
fresh directory, then reads every document back: captions must decode exactly, image
tokens must decode to pictures close to the stored pixels (PSNR over a sample; a PNG of
originals above reconstructions goes next to the shards). Stage rates are pairs per
second of one core for the reader stages (their seconds summed over the workers) and of
this process for the image tokenizer and the writer. With `prepare.runner=beam` the shard
phase runs on Beam workers and only its wall time is reported (the per-stage seconds stay
in the workers):

    python bench/prepare.py --out runs/prep_beam source.size=2000 prepare.runner=beam \
        "prepare.beam_options=[--runner=DirectRunner, --direct_num_workers=2, \
        --direct_running_mode=multi_processing]" prepare.image_tokenizer=DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.data.prepare import open_prepared, prepare  # noqa: E402
from cm3leon_jax.data.records import iter_documents  # noqa: E402

STAGES = ("read", "resize", "text", "image", "write")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def save_grid(top: np.ndarray, bottom: np.ndarray, path: Path, scale: int = 4) -> None:
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(top), 1), np.concatenate(list(bottom), 1)], 0)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--out", required=True, help="data directory (replaced)")
    p.add_argument("--sample", type=int, default=256, help="documents decoded for the PSNR")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = load_config(args.config, [*args.overrides, f"data.dir={args.out}"])
    load_before = os.getloadavg()[0]
    m = prepare(cfg)
    _, prepared = open_prepared(args.out)

    t0 = time.perf_counter()
    wrong, docs = 0, []
    for i, d in enumerate(iter_documents(args.out)):
        if prepared.text.decode(prepared.vocab.to_piece_ids(d["text"])) != d["caption"]:
            wrong += 1
        if i < args.sample:
            docs.append(d)
    read_back = time.perf_counter() - t0
    image = prepared.image
    pixels = np.stack([d["pixels"] for d in docs])
    recon = image.decode(np.stack([prepared.vocab.to_codes(d["image"]) for d in docs]))
    save_grid(pixels[:12], recon[:12], Path(args.out) / "decoded.png")

    s, n = m["seconds"], m["records"]
    report = {
        "source": cfg.source.kind, "records": n, "documents": m["documents"],
        "skipped": m["skipped"], "workers": cfg.prepare.workers, "runner": cfg.prepare.runner,
        "beam_options": list(cfg.prepare.beam_options),
        "resolution": m["resolution"], "tokens_per_image": m["tokens_per_image"],
        "pairs_per_s": {k: round(n / s[k]) for k in STAGES if s.get(k)},
        "tokenizer_seconds": {k: s[k] for k in ("text_tokenizer", "image_tokenizer")},
        "shard_seconds": round(m["wall_seconds"] - s["text_tokenizer"] - s["image_tokenizer"], 1),
        "wall_seconds": m["wall_seconds"],
        "captions_wrong": wrong, "read_back_docs_per_s": round(m["documents"] / read_back),
        "psnr_sample": round(psnr(pixels, recon), 2), "cpus": os.cpu_count(),
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    report["end_to_end_pairs_per_s"] = round(n / report["shard_seconds"])
    print(json.dumps(report))
    print(f"{cfg.source.kind}: {m['documents']:,}/{n:,} documents, captions wrong {wrong}, "
          f"PSNR {report['psnr_sample']} dB on {len(docs)}; pairs/s "
          + ", ".join(f"{k} {v:,}" for k, v in report["pairs_per_s"].items())
          + f"; end to end {report['end_to_end_pairs_per_s']:,}/s ({cfg.prepare.runner} "
          f"runner); {Path(args.out) / 'decoded.png'}")


if __name__ == "__main__":
    main()
