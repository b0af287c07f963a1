"""The `cm3leon` command: one subcommand per stage of the flow.

    cm3leon train  --config FILE --workdir DIR [section.key=value ...]
    cm3leon params --config FILE [--json] [--devices N] [section.key=value ...]
    cm3leon compile --config FILE --topology NAME [--json] [section.key=value ...]
    cm3leon prepare --config FILE [section.key=value ...]
    cm3leon tokenizer train-image --config FILE --workdir DIR [section.key=value ...]
    cm3leon generate image   --workdir RUN --prompt TEXT [--num N --cfg S --out FILE.png] [key=value ...]
    cm3leon generate caption --workdir RUN --image FILE [...] [key=value ...]
    cm3leon generate infill  --workdir RUN --before TEXT --after TEXT [key=value ...]
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

    from cm3leon_jax.parallel import distributed
    from cm3leon_jax.train.loop import BadStepsError, train

    distributed.initialize()  # before anything touches the devices
    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    try:
        train(cfg, args.workdir)
    except BadStepsError as e:
        print(f"cm3leon train: {e}", file=sys.stderr)
        sys.exit(3)


def cmd_params(args) -> None:
    from cm3leon_jax.model.size import flops_per_token, param_counts
    from cm3leon_jax.train.state import abstract_state, state_bytes_per_device, tree_bytes

    cfg = load_config(args.config, args.overrides, num_devices=args.devices)
    vocab = cfg.vocab.build()
    counts = param_counts(cfg.model, vocab.size)
    state = abstract_state(cfg)
    report = {
        "params": counts["total"],
        "flops_per_token": flops_per_token(cfg.model, vocab.size, cfg.data.seq_len),
        "state_bytes": tree_bytes(state),
    }
    if args.devices:
        report["state_bytes_per_device"] = state_bytes_per_device(cfg, args.devices)
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
    if args.devices:
        print(f"  per device      {report['state_bytes_per_device']:,} "
              f"(sharded over {args.devices} devices by the config's mesh)")


def cmd_compile(args) -> None:
    import importlib.util

    from cm3leon_jax.parallel.topology import parse_topology
    from cm3leon_jax.train.aot import DoesNotFit, advice, compile_train_step, format_report

    topology = parse_topology(args.topology)
    cfg = load_config(args.config, args.overrides, num_devices=topology.num_chips)
    if importlib.util.find_spec("libtpu") is None:
        print("cm3leon compile: needs libtpu, the TPU compiler: pip install -e '.[tpu]' "
              "(it works on machines without a TPU)", file=sys.stderr)
        raise SystemExit(2)
    try:
        report = compile_train_step(cfg, topology)
    except DoesNotFit as e:
        print(f"cm3leon compile: {args.config} {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(report.to_dict()) if args.json else format_report(report, args.config))
    if not report.fits:
        print(f"cm3leon compile: {args.config} {advice(cfg, topology, report)}",
              file=sys.stderr)
        raise SystemExit(1)


def cmd_generate(args) -> None:
    from cm3leon_jax.generate import command

    overrides = list(args.overrides)
    if getattr(args, "cfg", None) is not None:
        overrides.append(f"generate.cfg_scale={args.cfg}")
    if args.task == "image":
        command.generate_image(args.workdir, args.prompt, args.num, args.out, overrides)
    elif args.task == "caption":
        command.caption_images(args.workdir, args.image, overrides)
    else:
        command.infill_text(args.workdir, args.before, args.after, overrides)


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample images, captions or infills from a run")
    tasks = gen.add_subparsers(dest="task", required=True)
    helps = {"image": "text -> PNG grid of images", "caption": "image files -> captions",
             "infill": "fill the gap between two texts"}
    for task, text in helps.items():
        p = tasks.add_parser(task, help=text)
        p.add_argument("--workdir", required=True, help="run directory (config.yaml + checkpoints)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="e.g. generate.temperature=0.7 generate.pool=mixed data.dir=DIR")
        p.set_defaults(fn=cmd_generate)
        if task == "image":
            p.add_argument("--prompt", required=True, action="append", help="caption (repeatable)")
            p.add_argument("--num", type=int, default=4, help="images per prompt")
            p.add_argument("--cfg", type=float, help="guidance scale (generate.cfg_scale)")
            p.add_argument("--out", help="PNG path (default RUN/samples/generate-STEP.png)")
        elif task == "caption":
            p.add_argument("--image", required=True, action="append", help="image file (repeatable)")
        else:
            p.add_argument("--before", required=True, help="text before the gap")
            p.add_argument("--after", default="", help="text after the gap")


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
    p.add_argument("--devices", type=int, default=None,
                   help="also the train state bytes per device on a mesh of N devices")
    p.set_defaults(fn=cmd_params)

    p = _with_config(sub.add_parser(
        "compile", help="compile the train step for a TPU pod (no TPU needed): fit, cost"))
    p.add_argument("--topology", required=True,
                   help="TPU slice: v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips); "
                        "SxNAME for S slices, e.g. 2xv5p-128")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(fn=cmd_compile)
    p = _with_config(sub.add_parser("prepare", help="tokenize a source into data.dir"))
    p.set_defaults(fn=cmd_prepare)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(
        dest="tokenizer_command", required=True)
    p = _with_config(tok.add_parser("train-image", help="train the VQ-GAN image tokenizer "
                                    "on shapes images"))
    p.add_argument("--workdir", required=True, help="output: image_tokenizer/, PNG, metrics")
    p.set_defaults(fn=cmd_tokenizer_train_image)

    _generate_parser(sub)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"cm3leon {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
