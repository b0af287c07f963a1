"""`cm3leon retrieval train-encoder`, `cm3leon index`, `cm3leon neighbors`: their parsers and
what they run.

    cm3leon retrieval train-encoder --config FILE [section.key=value ...]
    cm3leon index  --config FILE [section.key=value ...]
    cm3leon neighbors --config FILE [--shard I --num-shards N | --merge N] [section.key=value ...]

Stage modules are imported when a command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import sys

from cm3leon_jax.config import load_config
from cm3leon_jax.config.cli import with_config
from cm3leon_jax.layout import retrieval_dir


def add_commands(sub) -> None:
    p = sub.add_parser("retrieval", help="retrieval encoder tasks")
    actions = p.add_subparsers(dest="action", required=True)
    p = with_config(actions.add_parser("train-encoder", help="train the built-in dual encoder"))
    p.set_defaults(fn=train_encoder)

    p = with_config(sub.add_parser("index", help="embed the memory bank, build ScaNN"))
    p.set_defaults(fn=build_index)

    p = with_config(sub.add_parser("neighbors", help="offline top-k neighbors table"))
    p.add_argument("--shard", type=int, default=0, help="this process's document range")
    p.add_argument("--num-shards", type=int, default=1, help="document ranges in all")
    p.add_argument("--merge", type=int, default=0, metavar="N",
                   help="join the N shard files into the table")
    p.set_defaults(fn=neighbors)


def train_encoder(args) -> None:
    from cm3leon_jax.retrieval import train_encoder  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.retrieval.neighbors import train_dir  # heavy: as above

    cfg = load_config(args.config, args.overrides)
    train_encoder.validate_for_training(cfg.retrieval)
    out = retrieval_dir(cfg).encoder
    info = train_encoder.train_encoder(cfg, train_dir(cfg), out)
    print(f"encoder: {info['steps']} steps in {info['seconds']} s, loss {info['loss_first']} -> "
          f"{info['loss_last']}, in-batch accuracy {info['batch_accuracy_last']}; saved to {out}")


def build_index(args) -> None:
    from cm3leon_jax.retrieval.neighbors import build_bank_index  # heavy: deferred (--help)

    cfg = load_config(args.config, args.overrides)
    m = build_bank_index(cfg)
    kind = m["kind"] if "shards" not in m else \
        f"{len(m['shards'])} shards of {m['shards'][0]['kind']}"
    print(f"index: {kind} over {m['size']:,} documents x {m['dim']} "
          f"({m['pairs']:,} pairs, {m['unembedded']} unembedded), embedded in "
          f"{m['embed_seconds']} s, built in {m['build_seconds']} s, recall@10 "
          f"{m['recall_at_10']} on {m['recall_queries']} queries; saved to "
          f"{retrieval_dir(cfg).index}")


def neighbors(args) -> None:
    from cm3leon_jax.retrieval.neighbors import (  # heavy: deferred (--help)
        compute_neighbors, fill_warning, merge_shards)

    cfg = load_config(args.config, args.overrides)
    if args.merge:
        m = merge_shards(cfg, args.merge)
    else:
        m = compute_neighbors(cfg, args.shard, args.num_shards)
        if args.num_shards > 1:
            print(f"neighbors shard {args.shard}/{args.num_shards}: documents {m['range']} "
                  f"in {m['seconds']} s, skipped {m['skipped']}")
            return
    print(f"neighbors: {m['documents']:,} documents x {'+'.join(m['lists'])} lists of "
          f"{m['pool']}; {m['fill']:.1%} have data.k={m['k']} distinct neighbors; distinct "
          f"neighbors per document {m['k_histogram']}; mean score {m['mean_score']}; skipped "
          f"{m['skipped']}; {m['documents_per_second']:,} documents/s; saved to "
          f"{retrieval_dir(cfg).root}")
    warning = fill_warning(m, cfg.retrieval.min_fill)
    if warning:
        print(warning, file=sys.stderr)
