"""The demo's image tokenizer on the demo's data: train, then score reconstructions.

    python bench/vq_demo.py --workdir /tmp/vq [section.key=value ...]
    python bench/vq_demo.py --workdir /tmp/vq --tokenizer /tmp/vq/image_tokenizer  # re-score
    python bench/vq_demo.py --workdir /tmp/vq --package  # retrain the packaged tokenizer

Trains on the images `prepare` would draw from `configs/demo.yaml`'s source (scenes below
source.size minus the held-out tail) and reports, on the demo's 512 reported scenes
(source.size onwards), what report.json calls `detector_on_reconstructions`, with PSNR,
codebook usage, the entropy of the codes (of pure-background patches and of all: what the
language model must predict) and the training time: one JSON line for bench/RESULTS.md.

--package (with the default config) retrains the tokenizer of the package's recipe for
`cm3leon demo` (demo/pretrained.py), says whether its weights equal the recorded bytes, and
writes it with its trained.json (this row, the commit, the digest) into
cm3leon_jax/demo/image_tokenizer (the weights are git-ignored, trained.json is tracked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.data.prepare import tokenizer_split  # noqa: E402
from cm3leon_jax.demo import pretrained  # noqa: E402
from cm3leon_jax.shapes import detector  # noqa: E402
from cm3leon_jax.shapes.world import (BACKGROUND, render_shapes, shapes_caption,  # noqa: E402
                                      shapes_scene)
from cm3leon_jax.tokenizers.image import ImageTokenizer  # noqa: E402
from cm3leon_jax.tokenizers.image_train import psnr, train_image_tokenizer  # noqa: E402


def scenes(first: int, count: int, seed: int, resolution: int, max_objects: int):
    objects = [shapes_scene(i, seed, resolution, max_objects) for i in range(first, first + count)]
    return (np.stack([render_shapes(o, resolution)[0] for o in objects]),
            [shapes_caption(o) for o in objects], objects)


def bits(codes: np.ndarray) -> float:
    """Entropy (bits) of the code histogram."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--workdir", required=True)
    p.add_argument("--scenes", type=int, default=512, help="reported scenes scored")
    p.add_argument("--tokenizer", help="score this saved tokenizer instead of training one")
    p.add_argument("--package", action="store_true",
                   help="write the trained tokenizer as the recipe's recorded one")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.package and (args.tokenizer or args.overrides or args.scenes != 512
                         or Path(args.config).name != "demo.yaml"):
        p.error("--package retrains configs/demo.yaml's tokenizer as it is: no --tokenizer, "
                "--scenes or overrides")
    cfg = load_config(args.config, args.overrides)
    s, v, t = cfg.source, cfg.vqgan, cfg.vqgan_train
    picks, held = tokenizer_split(s.size, t)
    if args.tokenizer:
        tok = ImageTokenizer.load(args.tokenizer)
        v = tok.config
        summary = json.loads((Path(args.tokenizer).parent / "summary.json").read_text())
    else:
        images, _, _ = scenes(0, s.size, s.seed, v.resolution, s.max_objects)
        tok, summary = train_image_tokenizer(v, t, images[picks], args.workdir, images[held.start:])
    truth, captions, objects = scenes(s.size, args.scenes, s.seed, v.resolution, s.max_objects)
    codes = tok.encode(truth)
    recon = tok.decode(codes)
    # What the language model has to predict: the entropy of the codes of patches that are
    # pure background (the same pixels everywhere: ideally one code, 0 bits) and of all.
    f = v.downsample
    n = v.latent_size
    patches = truth.reshape(len(truth), n, f, n, f, 3).transpose(0, 1, 3, 2, 4, 5)
    background = (patches == np.asarray(BACKGROUND, np.uint8)).all(axis=(3, 4, 5))
    hits = [detector.image_matches(im, c) for im, c in zip(recon, captions)]
    groups: dict = {}
    for hit, objs in zip(hits, objects):
        for o in objs:
            groups.setdefault(f"{o['size']} {o['shape']}", []).append(hit)
    row = {"overrides": args.overrides, "steps": summary["steps"],
           "train_seconds": summary["train_seconds"],
           "detector_on_reconstructions": float(np.mean(hits)),
           "psnr_reported_scenes": round(psnr(truth, recon), 2),
           "heldout_psnr": round(summary["psnr"], 2),
           "codebook_usage": summary["codebook_usage"],
           "perplexity": round(summary["codebook_perplexity"], 1),
           "background_patches": round(float(background.mean()), 3),
           "background_code_bits": round(bits(codes.reshape(background.shape)[background]), 2),
           "code_bits": round(bits(codes), 2),
           "by_object": {k: round(float(np.mean(g)), 2) for k, g in sorted(groups.items())},
           "load_avg_1m": round(os.getloadavg()[0], 1)}
    print(json.dumps(row))
    if args.package:
        package(Path(args.workdir) / "image_tokenizer", row,
                f"{args.config}: vqgan, vqgan_train; trained on source scenes 0..{held.start - 1}"
                f", heldout_psnr on {held.start}..{s.size - 1}, the rest on the reported "
                f"{s.size}..{s.size + args.scenes - 1}")


def package(trained: Path, row: dict, trained_on: str) -> None:
    """Copy `trained` over the shipped tokenizer with its trained.json; say whether it changed."""
    digest = hashlib.sha256((trained / "vqgan.npz").read_bytes()).hexdigest()
    before = pretrained.provenance()["sha256"]["vqgan.npz"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    for name in ("vqgan.json", "vqgan.npz"):
        shutil.copy(trained / name, pretrained.DIRECTORY / name)
    provenance = {"reproduce": "python bench/vq_demo.py --workdir DIR --package",
                  "trained_at_commit": commit, "trained_on": trained_on,
                  "sha256": {"vqgan.npz": digest},
                  "scores": {k: v for k, v in row.items() if k not in ("overrides",
                                                                      "load_avg_1m")}}
    (pretrained.DIRECTORY / "trained.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(f"packaged tokenizer: {'the same bytes' if digest == before else 'CHANGED'} "
          f"(sha256 {digest[:16]}, was {before[:16]})")


if __name__ == "__main__":
    main()
