"""`cm3leon sweep` and `cm3leon fit-scaling`: their parsers and what they run.

    cm3leon sweep  --config FILE --runs DIR [section.key=value ...]
    cm3leon fit-scaling RUNS_DIR [--out DIR]

Stage modules are imported when a command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub) -> None:
    p = with_config(sub.add_parser("sweep", help="scaling sweep: train and evaluate a "
                                   "family of sizes (resumes from DIR)"))
    p.add_argument("--runs", required=True, help="runs directory: one work dir per size")
    p.set_defaults(fn=run_sweep)

    p = sub.add_parser("fit-scaling", help="fit L(C) and L(N) to a sweep; print and plot")
    p.add_argument("runs_dir", help="the runs directory of `cm3leon sweep`")
    p.add_argument("--out", help="where fit.json and the PNG plots go (default: RUNS_DIR)")
    p.set_defaults(fn=run_fit)


def run_sweep(args) -> None:
    import jax  # heavy: deferred so cm3leon --help stays fast

    from cm3leon_jax.scaling.sweep import sweep  # heavy: as above

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    if not cfg.sweep.sizes:
        raise ConfigError(f"{args.config} has no sweep.sizes: not a sweep config "
                          "(see configs/scaling/)")
    try:
        sweep(cfg, args.runs)
    except FileNotFoundError as e:  # a data directory named by the config is missing
        raise SystemExit(f"cm3leon sweep: {e}") from None


def run_fit(args) -> None:
    from cm3leon_jax.scaling.fit import fit_scaling  # heavy: deferred (cm3leon --help)

    try:
        fit_scaling(args.runs_dir, args.out)
    except FileNotFoundError as e:
        raise SystemExit(f"cm3leon fit-scaling: {e}") from None
