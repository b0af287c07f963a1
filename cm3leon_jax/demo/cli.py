"""`cm3leon demo`: its parser and what it runs.

    cm3leon demo --workdir DIR [--config configs/demo.yaml] [section.key=value ...]
    cm3leon ablate-retrieval --workdir DIR [--config configs/demo.yaml] [--train-k 0,1,2]
                             [--infer-k 0,1,2] [section.key=value ...]

The default config ships with the package, so the demo runs from any directory. The job is
imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the main job on shapes: prepare, retrieval, train, "
                       "generate, report (reuses finished stages)")
    p.add_argument("--workdir", required=True, help="everything goes here; report.md, report.json")
    p.add_argument("--config", default="configs/demo.yaml", help="every stage's settings")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50")
    p.set_defaults(fn=run_demo)

    p = sub.add_parser("ablate-retrieval", help="the demo's model trained with 0, 1, 2 "
                       "retrieved documents, each scored with 0, 1, 2 retrieved at inference")
    p.add_argument("--workdir", required=True, help="a demo directory (its data, retrieval and "
                   "run are reused); writes ablation/ablation.md, .json, .png")
    p.add_argument("--config", default="configs/demo.yaml", help="every stage's settings")
    p.add_argument("--train-k", type=_ks, default=[0, 1, 2], metavar="K,K,...",
                   help="data.k of each run (default 0,1,2)")
    p.add_argument("--infer-k", type=_ks, default=[0, 1, 2], metavar="K,K,...",
                   help="documents retrieved at inference (default 0,1,2)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50")
    p.set_defaults(fn=run_ablation)


def _ks(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers of documents, e.g. 0,1,2") from None


def run_demo(args) -> None:
    from cm3leon_jax.demo.job import demo  # heavy: deferred so cm3leon --help stays fast

    demo(args.config, args.workdir, args.overrides)


def run_ablation(args) -> None:
    from cm3leon_jax.demo.ablate import ablate  # heavy: deferred so cm3leon --help stays fast

    ablate(args.config, args.workdir, args.overrides, args.train_k, args.infer_k)
