"""Image generation speed: KV-cache decoding vs recomputing the whole sequence each step,
or (--window) one token a pass vs speculative Jacobi decoding (SJD).

    python bench/generate.py --config configs/tiny.yaml --tokens 1024 [--batch 1] [--cfg 3]
        [section.key=value ...]
    python bench/generate.py --config configs/demo.yaml --tokens 64 --batch 4 --window 16
        [--run RUN_DIR]

Decodes `--tokens` image tokens after a text prompt, greedy, with classifier-free guidance
(two streams) unless --cfg 1; reports compile and decode seconds of both paths, tokens/s
and the speed-up, and checks that both produced the same tokens.

With --window: autoregressive vs SJD, greedy and sampled (temperature 1, top-p 0.9), the
same seeds, timed after a compile call; a table of tokens/s, seconds and forward passes per
image, tokens per forward pass. Without --run the model is a random init whose
zero-initialised projections get N(0, 0.05) noise (an untouched init only copies its last
token); SJD's acceptance depends on a trained model, so only --run measures the real gain.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cm3leon_jax.config import load_config
from cm3leon_jax.generate import prompts
from cm3leon_jax.generate.decode import (Decoding, Scales, decode, decode_cached,
                                         decode_uncached, left_pad)
from cm3leon_jax.train import weights
from cm3leon_jax.train.state import init_params, model_def


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=0, help="compare AR with SJD of this window")
    ap.add_argument("--run", help="--window: a trained run directory instead of random init")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.window:
        return speculative(args)
    caption_len = 12
    cfg = load_config(args.config, [f"model.max_seq_len={args.tokens + 16}",
                                    f"data.seq_len={args.tokens + 16}", *args.overrides])
    vocab = cfg.vocab.build()
    mdef = model_def(cfg)
    params = jax.jit(lambda: init_params(cfg, 0))()
    rng = np.random.default_rng(0)
    pairs = [prompts.text_to_image(vocab, vocab.text_ids(rng.integers(0, vocab.text_size,
                                                                      caption_len)))
             for _ in range(args.batch)]
    guided = args.cfg != 1.0
    streams = [[p[0] for p in pairs]] + ([[p[1] for p in pairs]] if guided else [])
    d = Decoding("image", args.tokens, temperature=0, guidance="cfg" if guided else "none")
    scales = Scales(cfg=args.cfg)
    results = {}
    for name, fn in (("cached", decode_cached), ("uncached", decode_uncached)):
        tokens, lengths = left_pad([p for s in streams for p in s], vocab.pad)
        inputs = (params, tokens, lengths, np.zeros(args.batch, bool),
                  Scales(*np.float32(scales)), jax.random.key(0))
        compiled, compile_s = timed(
            lambda: fn.lower(mdef.graphdef, *inputs, vocab=vocab, d=d).compile())
        out, seconds = timed(lambda: np.asarray(compiled(*inputs)))
        results[name] = (out, seconds)
        print(f"{name:>8}: compile {compile_s:.1f} s, decode {seconds:.2f} s, "
              f"{args.batch * d.steps / seconds:,.0f} image tokens/s",
              flush=True)
    same = np.array_equal(results["cached"][0], results["uncached"][0])
    speedup = results["uncached"][1] / results["cached"][1]
    print(f"batch {args.batch} x {args.tokens} tokens, {len(streams)} stream(s), "
          f"{jax.devices()[0].platform}: speed-up {speedup:.1f}x, same tokens: {same}")


def speculative(args) -> None:
    """AR vs SJD: the table of the module docstring."""
    if args.run:
        w = weights.load(args.run, overrides=args.overrides)
        cfg, graphdef, params = w.cfg, w.mdef.graphdef, w.params
    else:
        cfg = load_config(args.config, args.overrides)
        graphdef, params = model_def(cfg).graphdef, jax.jit(lambda: init_params(cfg, 0))()
        rng = np.random.default_rng(1)
        params = jax.tree.map(lambda a: a if np.any(a) else np.float32(
            rng.normal(0, 0.05, a.shape)), params)
    vocab = cfg.vocab.build()
    rng = np.random.default_rng(0)
    pairs = [prompts.text_to_image(vocab, vocab.text_ids(rng.integers(0, vocab.text_size, n)))
             for n in rng.integers(4, 16, args.batch)]
    streams, scales = [[p[0] for p in pairs], [p[1] for p in pairs]], Scales(cfg=args.cfg)
    rows = []
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9}):
        ar = None
        for window in (0, args.window):
            d = Decoding("image", args.tokens, guidance="cfg", jacobi_window=window, **sampling)
            run = lambda seed: decode(graphdef, params, vocab, streams, d, scales, seed=seed,
                                      forwards=True, max_seq_len=cfg.model.max_seq_len)
            run(0)  # compile
            (out, passes), seconds = timed(lambda: run(1))
            same = "-" if ar is None or sampling["temperature"] else str(np.array_equal(out, ar))
            ar = out if ar is None else ar
            rows.append((f"SJD W={window}" if window else "autoregressive",
                         "greedy" if not sampling["temperature"] else "T=1 top-p 0.9",
                         args.batch * args.tokens / seconds, seconds / args.batch,
                         passes.mean(), args.tokens / passes.mean(), same))
    print(f"{'' if args.run else 'random-init '}{args.config if not args.run else args.run}, "
          f"batch {args.batch} x {args.tokens} image tokens, CFG {args.cfg}, "
          f"{jax.devices()[0].platform}")
    print("| decoding | sampling | tokens/s | s/image | forwards/image | tokens/forward "
          "| = AR |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:,.0f} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.2f} "
              f"| {r[6]} |")


if __name__ == "__main__":
    main()
