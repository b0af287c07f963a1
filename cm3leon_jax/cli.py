"""The `cm3leon` command: one subcommand per stage of the flow.

    cm3leon train  --config FILE --workdir DIR [section.key=value ...]
    cm3leon params --config FILE [--json] [section.key=value ...]
    cm3leon retrieval train-encoder --config FILE [section.key=value ...]
    cm3leon index  --config FILE [section.key=value ...]
    cm3leon neighbors --config FILE [--shard I --num-shards N | --merge N] [section.key=value ...]
    cm3leon prepare --config FILE [section.key=value ...]
    cm3leon tokenizer train-image --config FILE --workdir DIR [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from cm3leon_jax.config import ConfigError, load_config


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50 mesh.fsdp=2")
    return p


def cmd_train(args) -> None:
    import jax

    from cm3leon_jax.train.loop import train

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    train(cfg, args.workdir)


def cmd_params(args) -> None:
    from cm3leon_jax.model.size import flops_per_token, param_counts
    from cm3leon_jax.train.state import abstract_state, tree_bytes

    cfg = load_config(args.config, args.overrides)
    vocab = cfg.vocab.build()
    counts = param_counts(cfg.model, vocab.size)
    state = abstract_state(cfg)
    report = {
        "params": counts["total"],
        "flops_per_token": flops_per_token(cfg.model, vocab.size, cfg.data.seq_len),
        "state_bytes": tree_bytes(state),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"config            {args.config}")
    print(f"parameters        {counts['total']:,} ({counts['total'] / 1e6:.1f}M)")
    for part in ("embedding", "positions", "layers", "lm_head"):
        print(f"  {part:<15} {counts[part]:,}")
    print(f"vocabulary        {vocab.size:,} rows ({vocab.used_size:,} used)")
    print(f"FLOPs per token   {report['flops_per_token']:.4g} "
          f"(training: 6 x matmul params + causal attention at seq {cfg.data.seq_len})")
    print(f"state bytes       {report['state_bytes']:,} "
          f"({report['state_bytes'] / 2**30:.2f} GiB: float32 params + AdamW mu, nu)")


def cmd_train_encoder(args) -> None:
    from cm3leon_jax.retrieval.neighbors import train_dir, retrieval_dir
    from cm3leon_jax.retrieval.train_encoder import train_encoder, validate_for_training

    cfg = load_config(args.config, args.overrides)
    validate_for_training(cfg.retrieval)
    out = retrieval_dir(cfg) / "encoder"
    info = train_encoder(cfg, train_dir(cfg), out)
    print(f"encoder: {info['steps']} steps in {info['seconds']} s, loss {info['loss_first']} -> "
          f"{info['loss_last']}, in-batch accuracy {info['batch_accuracy_last']}; saved to {out}")


def cmd_index(args) -> None:
    from cm3leon_jax.retrieval.neighbors import INDEX, build_bank_index, retrieval_dir

    cfg = load_config(args.config, args.overrides)
    m = build_bank_index(cfg)
    print(f"index: {m['kind']} over {m['size']:,} documents x {m['dim']} "
          f"({m['pairs']:,} pairs, {m['unembedded']} unembedded), embedded in "
          f"{m['embed_seconds']} s, built in {m['build_seconds']} s, recall@10 "
          f"{m['recall_at_10']} on {m['recall_queries']} queries; saved to "
          f"{retrieval_dir(cfg) / INDEX}")


def cmd_neighbors(args) -> None:
    from cm3leon_jax.retrieval.neighbors import compute_neighbors, merge_shards, retrieval_dir

    cfg = load_config(args.config, args.overrides)
    if args.merge:
        m = merge_shards(cfg, args.merge)
    else:
        m = compute_neighbors(cfg, args.shard, args.num_shards)
        if args.num_shards > 1:
            print(f"neighbors shard {args.shard}/{args.num_shards}: documents {m['range']} "
                  f"in {m['seconds']} s, skipped {m['skipped']}")
            return
    print(f"neighbors: {m['documents']:,} documents x k={m['k']}, {m['rows_with_k']:,} with k "
          f"found ({m['filled_fraction']:.1%} filled), mean score {m['mean_score']}, skipped "
          f"{m['skipped']}, {m['documents_per_second']:,} documents/s; saved to "
          f"{retrieval_dir(cfg)}")


def cmd_prepare(args) -> None:
    import logging

    from cm3leon_jax.data.prepare import PrepareError, prepare

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


def cmd_tokenizer_train_image(args) -> None:
    from cm3leon_jax.train.vqgan import train_from_config

    cfg = load_config(args.config, args.overrides)
    _, s = train_from_config(cfg, args.workdir)
    v = cfg.vqgan
    print(f"image tokenizer: {v.resolution}x{v.resolution} -> {v.tokens_per_image} tokens from "
          f"{v.codebook_size} codes; {s['steps']} steps on {s['train_images']} shapes images "
          f"in {s['train_seconds']:.0f}s")
    print(f"held-out PSNR {s['psnr']:.2f} dB on {s['eval_images']} images, codebook usage "
          f"{s['codebook_usage']:.1%}, {s['codes_restarted']} dead codes restarted")
    print(f"saved {args.workdir}/image_tokenizer, reconstructions.png, metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3leon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _with_config(sub.add_parser("train", help="train (resumes from DIR's checkpoints)"))
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics")
    p.set_defaults(fn=cmd_train)

    p = _with_config(sub.add_parser("params", help="parameter count, FLOPs, state bytes"))
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(fn=cmd_params)

    p = sub.add_parser("retrieval", help="retrieval encoder tasks")
    rsub = p.add_subparsers(dest="action", required=True)
    p = _with_config(rsub.add_parser("train-encoder", help="train the built-in dual encoder"))
    p.set_defaults(fn=cmd_train_encoder)

    p = _with_config(sub.add_parser("index", help="embed the memory bank, build ScaNN"))
    p.set_defaults(fn=cmd_index)

    p = _with_config(sub.add_parser("neighbors", help="offline top-k neighbors table"))
    p.add_argument("--shard", type=int, default=0, help="this process's document range")
    p.add_argument("--num-shards", type=int, default=1, help="document ranges in all")
    p.add_argument("--merge", type=int, default=0, metavar="N",
                   help="join the N shard files into the table")
    p.set_defaults(fn=cmd_neighbors)

    p = _with_config(sub.add_parser("prepare", help="tokenize a source into data.dir"))
    p.set_defaults(fn=cmd_prepare)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(
        dest="tokenizer_command", required=True)
    p = _with_config(tok.add_parser("train-image", help="train the VQ-GAN image tokenizer "
                                    "on shapes images"))
    p.add_argument("--workdir", required=True, help="output: image_tokenizer/, PNG, metrics")
    p.set_defaults(fn=cmd_tokenizer_train_image)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"cm3leon {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
