"""`cm3leon demo`: its parser and what it runs.

    cm3leon demo --workdir DIR [--config configs/demo.yaml] [section.key=value ...]

The default config ships with the package, so the demo runs from any directory. The job is
imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the main job on shapes: prepare, retrieval, train, "
                       "generate, report (reuses finished stages)")
    p.add_argument("--workdir", required=True, help="everything goes here; report.md, report.json")
    p.add_argument("--config", default="configs/demo.yaml", help="every stage's settings")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50")
    p.set_defaults(fn=run_demo)


def run_demo(args) -> None:
    from cm3leon_jax.demo.job import demo  # heavy: deferred so cm3leon --help stays fast

    demo(args.config, args.workdir, args.overrides)
