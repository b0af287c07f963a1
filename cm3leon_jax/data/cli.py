"""`cm3leon prepare`: its parser and what it runs.

    cm3leon prepare --config FILE [section.key=value ...]

Stage modules are imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import logging

from cm3leon_jax.config import load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub) -> None:
    p = with_config(sub.add_parser("prepare", help="tokenize a source into data.dir"))
    p.set_defaults(fn=run_prepare)


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
