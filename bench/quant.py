"""int8 weight-only quantisation (`generate.weights: int8`, model/quant.py): what it saves
and what it costs.

    python bench/quant.py aot --config configs/cm3leon_7b.yaml --topology v5p-8 [--batch 2]
        [section.key=value ...]
    python bench/quant.py quality --run DIR [--steps 200]

aot: compiles the generation step (`cm3leon compile --step generate`, aot/generate_step.py)
for the pod twice, float and int8 weights, and prints the per-chip bytes of both (needs the
`tpu` extra; no TPU).

quality: the held-out loss (train/heldout.py, the config's fixed held-out set) of a trained
run's parameters, float and int8; on those rows (teacher-forced) the fraction of scored
tokens whose argmax the int8 model shares with the float one; and free-running, the fraction
of greedy image tokens (CFG 3, 64 tokens after 8 captions) it shares, with the step where
each image first differs (after one differing token the rest of an image follows it). A DIR
without a checkpoint is first trained from configs/tiny.yaml for --steps steps (30 s for 200
on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from cm3leon_jax.layout import is_run


def aot(args) -> None:
    from cm3leon_jax.aot import generate_step  # heavy: jax and the TPU compiler
    from cm3leon_jax.aot.topology import GiB, parse_topology  # heavy: as above
    from cm3leon_jax.config import load_config

    topology = parse_topology(args.topology)
    rows = []
    for weights in ("float", "int8"):
        cfg = load_config(args.config, [*args.overrides, f"generate.weights={weights}"],
                          num_devices=topology.num_chips)
        shape_of = lambda chips, cfg=cfg: generate_step.generate_shape(cfg, chips, args.batch)
        r = generate_step.compile_generate_step(cfg, topology, shape_of)
        print(json.dumps(r.to_dict()), flush=True)
        rows.append(r)
    print(f"\n{args.config} on {args.topology}, {rows[0].batch} image(s) of "
          f"{rows[0].image_tokens} tokens after {rows[0].prompt_tokens}, "
          f"{rows[0].streams} stream(s), GiB per chip:")
    print("| weights | params | arguments | KV cache | temporaries | total | compile |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.weights} | {r.param_bytes / GiB:.2f} | {r.argument_bytes / GiB:.2f} | "
              f"{r.kv_cache_bytes / GiB:.2f} | {r.temp_bytes / GiB:.2f} | "
              f"{r.total_bytes / GiB:.2f} of {r.hbm_bytes / GiB:.0f} | "
              f"{r.compile_seconds:.0f} s |")


def quality(args) -> None:
    if not is_run(args.run):
        start = time.perf_counter()
        subprocess.run(["cm3leon", "train", "--config", "configs/tiny.yaml", "--workdir",
                        args.run, f"train.steps={args.steps}",
                        f"train.checkpoint_every={args.steps}"], check=True)
        print(f"trained {args.run}: {time.perf_counter() - start:.0f} s")
    import jax  # heavy: after training, which runs in its own process
    import jax.numpy as jnp  # heavy: as above

    from cm3leon_jax.generate import prompts
    from cm3leon_jax.generate.decode import Decoding, Scales, decode
    from cm3leon_jax.model import quant
    from cm3leon_jax.train import weights
    from cm3leon_jax.train.heldout import Evaluator, heldout_batches

    w = weights.load(args.run)
    params = {"float": w.params,
              "int8": quant.quantize_placed(w.params, w.mdef.param_axes, w.mesh)}
    batches = heldout_batches(w.cfg)
    evaluate = Evaluator(w.cfg, batches)
    losses = {k: evaluate(p) for k, p in params.items()}
    best = jax.jit(lambda p, b: jnp.argmax(w.mdef.bind(p).logits(w.mdef.bind(p)(
        b["inputs"], b["positions"], b["segment_ids"])), axis=-1))
    same = scored = 0
    for b in batches:
        agree = np.asarray(best(params["float"], b) == best(params["int8"], b))
        scored += int((b["weights"] > 0).sum())
        same += int(agree[b["weights"] > 0].sum())
    vocab = w.cfg.vocab.build()
    rng = np.random.default_rng(0)
    pairs = [prompts.text_to_image(vocab, vocab.text_ids(rng.integers(0, vocab.text_size, n)))
             for n in rng.integers(4, 16, 8)]
    streams = [[p[0] for p in pairs], [p[1] for p in pairs]]
    d = Decoding("image", 64, temperature=0, guidance="cfg")
    tokens = {k: decode(w.mdef.graphdef, p, vocab, streams, d, Scales(cfg=3.0), mesh=w.mesh)
              for k, p in params.items()}
    first = np.argmax(tokens["float"] != tokens["int8"], axis=1)
    first[(tokens["float"] == tokens["int8"]).all(axis=1)] = d.steps
    bytes_ = {k: sum(x.nbytes for x in jax.tree.leaves(p)) for k, p in params.items()}
    out = {"run": args.run, "step": w.step,
           **{f"{k}_{m}": v[m] for k, v in losses.items() for m in ("loss", "text_loss",
                                                                   "image_loss")},
           "loss_delta": losses["int8"]["loss"] - losses["float"]["loss"],
           "heldout_argmax_same_fraction": same / scored, "heldout_scored_tokens": scored,
           "greedy_same_fraction": float(np.mean(tokens["float"] == tokens["int8"])),
           "greedy_first_difference": first.tolist(),
           "param_bytes": bytes_}
    print(json.dumps(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("aot")
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=aot)
    p = sub.add_parser("quality")
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.set_defaults(fn=quality)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
