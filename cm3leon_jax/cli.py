"""The `cm3leon` command: one subcommand per stage of the flow.

    cm3leon train  --config FILE --workdir DIR [section.key=value ...]
    cm3leon params --config FILE [--json] [section.key=value ...]
    cm3leon sweep  --config FILE --runs DIR [section.key=value ...]
    cm3leon fit-scaling RUNS_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def cmd_sweep(args) -> None:
    import jax

    from cm3leon_jax.scaling.sweep import sweep

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    if not cfg.sweep.sizes:
        raise ConfigError(f"{args.config} has no sweep.sizes: not a sweep config "
                          "(see configs/scaling/)")
    if jax.config.jax_compilation_cache_dir is None:
        # every evaluation step restarts `train`: the cache turns recompiles into reads
        jax.config.update("jax_compilation_cache_dir", str(Path(args.runs) / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    try:
        sweep(cfg, args.runs)
    except FileNotFoundError as e:  # a data directory named by the config is missing
        raise SystemExit(f"cm3leon sweep: {e}") from None


def cmd_fit_scaling(args) -> None:
    from cm3leon_jax.scaling.fit import fit_scaling

    try:
        fit_scaling(args.runs_dir, args.out)
    except FileNotFoundError as e:
        raise SystemExit(f"cm3leon fit-scaling: {e}") from None


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

    p = _with_config(sub.add_parser("sweep", help="scaling sweep: train and evaluate a "
                                    "family of sizes (resumes from DIR)"))
    p.add_argument("--runs", required=True, help="runs directory: one work dir per size")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("fit-scaling", help="fit L(C) and L(N) to a sweep; print and plot")
    p.add_argument("runs_dir", help="the runs directory of `cm3leon sweep`")
    p.add_argument("--out", help="where fit.json and the PNG plots go (default: RUNS_DIR)")
    p.set_defaults(fn=cmd_fit_scaling)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"cm3leon {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
