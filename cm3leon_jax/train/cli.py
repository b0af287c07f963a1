"""`cm3leon train` and `cm3leon params`: their parsers and what they run.

    cm3leon train  --config FILE --workdir DIR [section.key=value ...]
    cm3leon params --config FILE [--json] [--devices N] [section.key=value ...]

Stage modules are imported when a command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import json
import sys

from cm3leon_jax.config import load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub) -> None:
    p = with_config(sub.add_parser("train", help="train (resumes from DIR's checkpoints)"))
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics")
    p.set_defaults(fn=lambda args: run_training("train", args.config, args.overrides,
                                                args.workdir))

    p = with_config(sub.add_parser("params", help="parameter count, FLOPs, state bytes"))
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--devices", type=int, default=None,
                   help="also the train state bytes per device on a mesh of N devices")
    p.set_defaults(fn=params)


def run_training(command: str, config: str, overrides: list[str], workdir: str,
                 data_for=None) -> None:
    """Join the multi-process job, load the config, train (on `data_for(cfg)`, else the
    pretraining data); a run of bad steps exits 3."""
    import jax  # heavy: deferred so cm3leon --help stays fast

    from cm3leon_jax.parallel import distributed  # heavy: as above
    from cm3leon_jax.train.trainer import BadStepsError, train  # heavy: as above

    distributed.initialize()  # before anything touches the devices
    cfg = load_config(config, overrides, num_devices=jax.device_count())
    try:
        train(cfg, workdir, data_for(cfg) if data_for else None)
    except BadStepsError as e:
        print(f"cm3leon {command}: {e}", file=sys.stderr)
        sys.exit(3)


def params(args) -> None:
    from cm3leon_jax.train import state  # heavy: deferred so cm3leon --help stays fast

    cfg = load_config(args.config, args.overrides, num_devices=args.devices)
    vocab = cfg.vocab.build()
    counts = cfg.model.param_counts(vocab.size)
    report = {
        "params": counts["total"],
        "flops_per_token": cfg.model.flops_per_token(vocab.size, cfg.data.seq_len),
        "state_bytes": state.tree_bytes(state.abstract_state(cfg)),
    }
    if args.devices:
        report["state_bytes_per_device"] = state.state_bytes_per_device(cfg, args.devices)
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
