"""Speculative Jacobi decoding on a trained demo run: forward passes per image and
text->image accuracy (the shapes detector), one token a pass against SJD windows, on the
demo's held-out scenes with the demo's sampling settings (CFG, temperature, top-p) and the
same seed; greedy too, where SJD must give the same tokens.

    python bench/sjd_demo.py --demo DIR [--scenes 256] [--batch 256] [--windows 4,8,16]
        [generate.weights=int8]

DIR is a finished `cm3leon demo` directory (its run/ and data/). The scenes are decoded
`--batch` at a time; SJD's rows share one cache write index, so a batch moves at its slowest
row's pace and `--batch 1` gives the forward passes of one image on its own.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cm3leon_jax.demo import job
from cm3leon_jax.generate import prompts, tasks
from cm3leon_jax.generate.decode import Decoding, Scales, decode
from cm3leon_jax.layout import DemoDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True)
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--windows", default="4,8,16")
    ap.add_argument("overrides", nargs="*", help="e.g. generate.weights=int8")
    args = ap.parse_args()
    cfg, model, toks, step = tasks.load_model(DemoDir(args.demo).run.root,
                                              overrides=args.overrides)
    n_tokens = toks.image.tokens_per_image
    scenes = job.held_out(cfg, toks.image.resolution)[:args.scenes]
    captions = [p.caption for p in scenes]
    vocab = model.vocab
    pairs = [prompts.text_to_image(vocab, vocab.text_ids(toks.text.encode(c))) for c in captions]
    chunks = [[[p[0] for p in pairs[i:i + args.batch]], [p[1] for p in pairs[i:i + args.batch]]]
              for i in range(0, len(pairs), args.batch)]
    g = cfg.generate
    scales = Scales(cfg=g.cfg_scale)
    n = len(scenes)
    print(f"{args.demo}: checkpoint {step}, {n} held-out scenes x {n_tokens} image tokens, "
          f"CFG {g.cfg_scale}, batches of {args.batch}, {g.weights} weights, "
          f"{jax.devices()[0].platform}")
    print("| decoding | sampling | forwards/image | tokens/forward | s/image | accuracy | = AR |")
    print("|---|---|---|---|---|---|---|")
    for sampling in (dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k),
                     dict(temperature=0.0)):
        name = "greedy" if not sampling["temperature"] else (
            f"T={g.temperature} top-p {g.top_p}")
        ar = None
        for window in [0, *map(int, args.windows.split(","))]:
            d = Decoding("image", n_tokens, guidance="cfg", jacobi_window=window, **sampling)
            run = lambda streams: decode(model.graphdef, model.params, vocab, streams, d,
                                         scales, seed=g.seed, forwards=True, mesh=model.mesh,
                                         max_seq_len=model.max_seq_len)
            run(chunks[0])  # compile
            t0 = time.perf_counter()
            results = [run(c) for c in chunks]
            seconds = time.perf_counter() - t0
            out = np.concatenate([np.asarray(o) for o, _ in results])
            passes = np.concatenate([np.broadcast_to(p, (len(o),)) for o, p in results])
            pixels = toks.image.decode(vocab.to_codes(np.asarray(out)).reshape(-1, n_tokens))
            acc = job.accuracy(pixels, scenes)
            se = np.sqrt(acc * (1 - acc) / n)
            same = "-" if ar is None or sampling["temperature"] else str(np.array_equal(out, ar))
            ar = out if ar is None else ar
            print(f"| {'SJD W=%d' % window if window else 'autoregressive'} | {name} | "
                  f"{np.mean(passes):.1f} | {n_tokens / np.mean(passes):.2f} | "
                  f"{seconds / n:.4f} | {acc:.3f} ± {se:.3f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
