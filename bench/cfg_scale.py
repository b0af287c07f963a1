"""Text -> image accuracy of a `cm3leon demo` run against the classifier-free guidance scale.

    python bench/cfg_scale.py --workdir runs/demo --scenes 256 --scales 1 1.5 2 3 5 --seeds 0 1 \
        [--temperatures 1.0 0.7] [--retrieval]

Held-out scenes after the demo's reported ones (indices source.size + `--first` on), scored
from pixels by shapes/detector.py; each (temperature, scale, seed) samples every scene
once. Prints one JSON line per run and a table of the accuracy per seed and its mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from cm3leon_jax.data.sources import ShapesSource
from cm3leon_jax.demo.job import demo_config
from cm3leon_jax.generate import tasks
from cm3leon_jax.layout import DemoDir
from cm3leon_jax.retrieval.query import Retriever
from cm3leon_jax.shapes import detector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="a `cm3leon demo` directory")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--first", type=int, default=None, help="skip this many held-out scenes "
                    "(default demo.eval_scenes: tune on scenes the demo does not report)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--retrieval", action="store_true", help="retrieved documents in front")
    ap.add_argument("--out", help="JSON lines file for the results")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    cfg = demo_config(args.config, workdir)
    _, model, toks, step = tasks.load_model(DemoDir(workdir).run.root)
    tok = toks.image
    s = cfg.source
    if args.first is None:
        args.first = cfg.demo.eval_scenes
    start = s.size + args.first
    source = ShapesSource(start + args.scenes, s.resolution or tok.resolution, s.seed,
                          s.max_objects)
    captions = [source[i].caption for i in range(start, len(source))]
    ids = [model.vocab.text_ids(toks.text.encode(c)) for c in captions]
    retrieved = None
    if args.retrieval:
        retrieved = Retriever(cfg).documents(captions, ids, cfg.data.k)
    rows = []
    for temperature in args.temperatures:
        for scale in args.scales:
            for seed in args.seeds:
                t0 = time.perf_counter()
                g = dataclasses.replace(cfg.generate, candidates=1, cfg_scale=scale, seed=seed,
                                        temperature=temperature)
                codes = tasks.text_to_image(model, ids, tok.tokens_per_image, g,
                                            retrieved=retrieved)
                pixels = tok.decode(codes.reshape(-1, tok.tokens_per_image))
                hits = [detector.image_matches(im, c) for im, c in zip(pixels, captions)]
                row = {"temperature": temperature, "scale": scale, "seed": seed,
                       "accuracy": float(np.mean(hits)), "scenes": len(captions),
                       "first": args.first, "retrieval": args.retrieval, "step": step,
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\n{len(captions)} held-out scenes from {start}, checkpoint {step}, "
          f"retrieval={args.retrieval}")
    print("| temperature | cfg scale | " + " | ".join(f"seed {s}" for s in args.seeds) +
          " | mean |")
    print("|---" * (len(args.seeds) + 3) + "|")
    for temperature in args.temperatures:
        for scale in args.scales:
            accs = [r["accuracy"] for r in rows
                    if r["scale"] == scale and r["temperature"] == temperature]
            print(f"| {temperature:g} | {scale:g} | " + " | ".join(f"{a:.3f}" for a in accs) +
                  f" | {np.mean(accs):.3f} |")


if __name__ == "__main__":
    main()
