"""`cm3leon score`: its parser and what it runs.

    cm3leon score (--workdir RUN [--step N] | --export DIR) --tokens IN.npy --out OUT.npy

Stage modules are imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

from cm3leon_jax.config import ConfigError


def add_commands(sub) -> None:
    p = sub.add_parser("score", help="per-token log-probabilities of token sequences")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory (its checkpoints/)")
    src.add_argument("--export", help="directory written by `export --format safetensors`")
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
    p.add_argument("--tokens", required=True, help="[B, T] integer token ids (.npy)")
    p.add_argument("--out", required=True, help="[B, T-1] float32 log-probabilities (.npy)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows per step over all devices (rounded up to the data-parallel size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: the run's model.dtype)")
    p.set_defaults(fn=run_score)


def run_score(args) -> None:
    from cm3leon_jax.eval import score  # heavy: deferred so cm3leon --help stays fast
    from cm3leon_jax.train import weights  # heavy: as above

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if args.export is not None and args.step is not None:
        raise ConfigError("--step applies to --workdir runs only")
    tokens = score.load_tokens(args.tokens)  # every check before any weight is read
    path = args.workdir or args.export
    cfg, _, _ = weights.saved_config(path, args.step)
    score.check_tokens(tokens, cfg, args.tokens)
    w = weights.load(path, args.step, dtype=args.dtype)
    s = score.save_scores(score.score_tokens(w, tokens, args.batch_size), args.out)
    print(f"scored {s['rows']} rows ({s['tokens']} tokens) with {w.origin}: "
          f"mean log-prob {s['mean_logprob']:.4f}, perplexity {s['perplexity']:.3f} "
          f"-> {s['out']}")
