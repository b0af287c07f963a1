"""`cm3leon export`: its parser and what it runs.

    cm3leon export --workdir RUN [--step N] --format safetensors|hf-opt --out DIR
                   [--skip-tokenizers] [--shard-bytes N]

Stage modules are imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint -> safetensors or HF OPT directory")
    p.add_argument("--workdir", required=True, help="run directory (its checkpoints/) or export")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--format", required=True, choices=["safetensors", "hf-opt"])
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--skip-tokenizers", action="store_true",
                   help="weights only: no tokenizers (neither the run's nor, for hf-opt, the "
                        "transformers tokenizer)")
    p.add_argument("--shard-bytes", type=int,
                   help="hf-opt: largest weights file in bytes; more make "
                        "model-0000k-of-0000N.safetensors + an index (default 5000000000, "
                        "the Hub's)")
    p.set_defaults(fn=run_export)


def run_export(args) -> None:
    from cm3leon_jax.export.write import export  # heavy: deferred (cm3leon --help)

    export(args.workdir, args.out, args.format, step=args.step,
           with_tokenizers=not args.skip_tokenizers, shard_bytes=args.shard_bytes)
