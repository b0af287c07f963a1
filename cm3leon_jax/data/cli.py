"""`cm3leon prepare` and `cm3leon data-stats`: their parsers and what they run.

    cm3leon prepare --config FILE [section.key=value ...]
    cm3leon data-stats --config FILE [--examples N] [--json] [section.key=value ...]

Stage modules are imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import json
import logging

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub) -> None:
    p = with_config(sub.add_parser("prepare", help="tokenize a source into data.dir"))
    p.set_defaults(fn=run_prepare)

    p = with_config(sub.add_parser(
        "data-stats", help="the training input measured: masking, row fill, retrieved k "
        "(data.dir, or synthetic documents at the config's shapes)"))
    p.add_argument("--examples", type=int, default=2000, help="examples to measure")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(fn=run_data_stats)


def run_prepare(args) -> None:
    from cm3leon_jax.data.prepare import PrepareError, prepare  # heavy: deferred (--help)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    try:
        m = prepare(cfg)
    except PrepareError as e:
        raise SystemExit(f"cm3leon prepare: {e}") from None
    skipped = ", ".join(f"{k} {v}" for k, v in m["skipped"].items()) or "none"
    print(f"prepared {cfg.data.dir}: {m['documents']:,} documents from {m['records']:,} "
          f"records in {len(m['shards'])} shards (skipped: {skipped})")
    print(f"vocabulary {m['vocab']['size']:,} ids ({m['text_pieces']} text pieces, "
          f"{m['vocab']['image_size']} image codes); {m['tokens_per_image']} tokens per "
          f"{m['resolution']}x{m['resolution']} image")
    rates = "  ".join(f"{k} {m['records'] / v:,.0f}/s" for k, v in m["seconds"].items()
                      if k in ("read", "resize", "text", "image", "write") and v > 0)
    print(f"pairs per second by stage: {rates}  (wall {m['wall_seconds']:.1f}s)")


def run_data_stats(args) -> None:
    from cm3leon_jax.data.stats import data_stats  # heavy: deferred (cm3leon --help)

    if args.examples < 1:
        raise ConfigError(f"--examples {args.examples} must be >= 1")
    stats = data_stats(load_config(args.config, args.overrides), args.examples,
                       progress=not args.json)
    if args.json:
        print(json.dumps(stats))
        return
    width = max(map(len, stats))
    for key, value in stats.items():
        print(f"{key:<{width}}  {value}")
