"""`cm3leon compile`: its parser and what it runs.

    cm3leon compile --config FILE --topology NAME [--step train|generate] [--fit-batch] [--json]
                    [section.key=value ...]

Stage modules are imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from cm3leon_jax.config import load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub) -> None:
    p = with_config(sub.add_parser(
        "compile", help="compile the train step for a TPU pod (no TPU needed): fit, cost"))
    p.add_argument("--topology", required=True,
                   help="TPU slice: v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips); "
                        "SxNAME for S slices, e.g. 2xv5p-128")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--step", choices=("train", "generate"), default="train",
                   help="the train step, or image generation (prefill + KV-cache decoding)")
    p.add_argument("--batch", type=int, default=None,
                   help="generate: images per step (default generate.candidates)")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="generate: tokens per image (default generate.image_tokens, else "
                        "the vqgan section's)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="generate: prompt length (default: the rest of model.max_seq_len)")
    p.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="generate: with the classifier-free-guidance stream (default: as "
                        "the generate section would)")
    p.add_argument("--fit-batch", action="store_true",
                   help="train: compile at several train.grad_accum (a binary search) and "
                        "report the largest micro-batch per chip that fits")
    p.set_defaults(fn=compile_step)


def compile_step(args) -> None:
    from cm3leon_jax.aot import generate_step, train_step  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.aot.compile import DoesNotFit  # heavy: as above
    from cm3leon_jax.aot.topology import parse_topology  # heavy: as above

    topology = parse_topology(args.topology)
    cfg = load_config(args.config, args.overrides, num_devices=topology.num_chips)
    if args.step == "generate":
        shape_of = lambda chips: generate_step.generate_shape(
            cfg, chips, args.batch, args.image_tokens, args.prompt_tokens, args.cfg)
        shape_of(1)  # bad sizes fail here, before libtpu or the compiler start
    if importlib.util.find_spec("libtpu") is None:
        print("cm3leon compile: needs libtpu, the TPU compiler: pip install -e '.[tpu]' "
              "(it works on machines without a TPU)", file=sys.stderr)
        raise SystemExit(2)
    step = generate_step if args.step == "generate" else train_step
    if args.fit_batch:
        if args.step != "train":
            print("cm3leon compile: --fit-batch searches train.grad_accum; it is for --step "
                  "train (generate: pass --batch)", file=sys.stderr)
            raise SystemExit(2)
        cfg, report = _fit_batch(cfg, topology, args)
    try:
        if args.step == "generate":
            report = generate_step.compile_generate_step(cfg, topology, shape_of)
        elif not args.fit_batch:
            report = train_step.compile_train_step(cfg, topology)
    except DoesNotFit as e:
        print(f"cm3leon compile: {args.config} {e}", file=sys.stderr)
        raise SystemExit(1) from None
    out = report.to_dict()
    if args.fit_batch:
        out["grad_accum"] = cfg.train.grad_accum
    print(json.dumps(out) if args.json else step.format_report(report, args.config))
    if not report.fits:
        print(f"cm3leon compile: {args.config} {step.fit_advice(cfg, topology, report)}",
              file=sys.stderr)
        raise SystemExit(1)


def _fit_batch(cfg, topology, args):
    """(the config at the largest fitting micro-batch, its compile report)."""
    from cm3leon_jax.aot import train_step  # heavy: deferred (cm3leon --help)

    best, tried = train_step.largest_fitting_micro_batch(
        cfg, topology, progress=lambda line: print(f"fit-batch: {line}", file=sys.stderr))
    if best is None:
        g, rows, _ = tried[-1]
        print(f"cm3leon compile: {args.config} does not fit {topology.name} even at "
              f"train.grad_accum={g} ({rows} sequence(s) per chip); see the advice of a "
              "compile without --fit-batch", file=sys.stderr)
        raise SystemExit(1)
    print(f"fit-batch: largest micro-batch that fits: train.grad_accum={best.train.grad_accum}",
          file=sys.stderr)
    return best, next(r for g, _, r in tried if g == best.train.grad_accum)
