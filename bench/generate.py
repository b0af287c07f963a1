"""Image generation speed: KV-cache decoding vs recomputing the whole sequence each step,
or (--window) one token a pass vs speculative Jacobi decoding (SJD).

    python bench/generate.py --config configs/tiny.yaml --tokens 1024 [--batch 1] [--cfg 3]
        [section.key=value ...]
    python bench/generate.py --config configs/demo.yaml --tokens 64 --batch 4 --window 16
    python bench/generate.py --demo DIR [--scenes 256] [--batch 256] [--windows 4,8,16]
        [generate.weights=int8]

Decodes `--tokens` image tokens after a text prompt, greedy, with classifier-free guidance
(two streams) unless --cfg 1; reports compile and decode seconds of both paths, tokens/s
and the speed-up, and checks that both produced the same tokens.

With --window: autoregressive vs SJD on a random init, greedy and sampled (temperature 1,
top-p 0.9), the same seeds, timed after a compile call; a table of tokens/s, seconds and
forward passes per image, tokens per forward pass. The init's zero-initialised projections
get N(0, 0.05) noise (an untouched init only copies its last token); SJD's acceptance
depends on a trained model, so this measures the cost of a pass, not the gain.

With --demo: the gain, on a finished `cm3leon demo` directory (its run/ and data/): forward
passes per image and text->image accuracy (the shapes detector) of one token a pass against
SJD windows, on the demo's held-out scenes with the demo's sampling settings (CFG,
temperature, top-p) and seed; greedy too, where SJD must give the same tokens. The scenes
are decoded `--batch` at a time; a batch runs until its slowest row is done (finished rows
idle), so `--batch 1` gives the passes of one image on its own.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cm3leon_jax.config import load_config
from cm3leon_jax.demo import job
from cm3leon_jax.generate import prompts, tasks
from cm3leon_jax.generate.decode import (Decoding, Scales, decode, decode_cached,
                                         decode_uncached, left_pad)
from cm3leon_jax.layout import DemoDir
from cm3leon_jax.train.state import init_params, model_def


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the model's config (all but --demo)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=0, help="compare AR with SJD of this window")
    ap.add_argument("--demo", help="SJD on this finished demo directory's model and scenes")
    ap.add_argument("--scenes", type=int, default=256, help="--demo: held-out scenes")
    ap.add_argument("--windows", default="4,8,16", help="--demo: SJD windows")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.demo:
        return speculative_demo(args)
    if not args.config:
        ap.error("--config is required without --demo")
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
    """AR vs SJD on a random init: the cost of a pass (the module docstring)."""
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
    print(f"random-init {args.config}, "
          f"batch {args.batch} x {args.tokens} image tokens, CFG {args.cfg}, "
          f"{jax.devices()[0].platform}")
    print("| decoding | sampling | tokens/s | s/image | forwards/image | tokens/forward "
          "| = AR |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:,.0f} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.2f} "
              f"| {r[6]} |")


def speculative_demo(args) -> None:
    """AR vs SJD windows on a trained demo: passes and accuracy (the module docstring)."""
    cfg, model, toks, step = tasks.load_model(DemoDir(args.demo).run.root,
                                              overrides=args.overrides)
    if cfg.source.kind != "shapes":
        raise SystemExit(f"--demo {args.demo}: source.kind is {cfg.source.kind!r}; the "
                         "accuracy here is the shapes detector's, a shapes demo only")
    n_tokens = toks.image.tokens_per_image
    scenes = job.held_out(cfg, toks.image.resolution)[:args.scenes]
    vocab = model.vocab
    pairs = [prompts.text_to_image(vocab, vocab.text_ids(toks.text.encode(p.caption)))
             for p in scenes]
    chunks = [[[p[0] for p in pairs[i:i + args.batch]], [p[1] for p in pairs[i:i + args.batch]]]
              for i in range(0, len(pairs), args.batch)]
    g, n = cfg.generate, len(scenes)
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
                                         Scales(cfg=g.cfg_scale), seed=g.seed, forwards=True,
                                         mesh=model.mesh, max_seq_len=model.max_seq_len)
            run(chunks[0])  # compile
            results, seconds = timed(lambda: [run(c) for c in chunks])
            out = np.concatenate([np.asarray(o) for o, _ in results])
            passes = np.concatenate([np.broadcast_to(p, (len(o),)) for o, p in results])
            pixels = toks.image.decode(vocab.to_codes(out).reshape(-1, n_tokens))
            acc = job.accuracy(pixels, scenes)
            se = np.sqrt(acc * (1 - acc) / n)
            same = "-" if ar is None or sampling["temperature"] else str(np.array_equal(out, ar))
            ar = out if ar is None else ar
            print(f"| {'SJD W=%d' % window if window else 'autoregressive'} | {name} | "
                  f"{np.mean(passes):.1f} | {n_tokens / np.mean(passes):.2f} | "
                  f"{seconds / n:.4f} | {acc:.3f} ± {se:.3f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
