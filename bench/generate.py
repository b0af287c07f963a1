"""Image generation speed: KV-cache decoding vs recomputing the whole sequence each step.

    python bench/generate.py --config configs/tiny.yaml --tokens 1024 [--batch 1] [--cfg 3]
        [section.key=value ...]

Decodes `--tokens` image tokens after a text prompt, greedy, with classifier-free guidance
(two streams) unless --cfg 1; reports compile and decode seconds of both paths, tokens/s
and the speed-up, and checks that both produced the same tokens.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cm3leon_jax.config import load_config
from cm3leon_jax.generate import prompts
from cm3leon_jax.generate.decode import (Decoding, Scales, decode_cached, decode_uncached,
                                         left_pad)
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
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
