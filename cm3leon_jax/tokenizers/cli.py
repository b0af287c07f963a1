"""`cm3leon tokenizer train-image`: its parser and what it runs.

    cm3leon tokenizer train-image --config FILE --workdir DIR [section.key=value ...]

`cm3leon tokenizer eval-image` joins these commands from eval/cli.py: it reads the source
(data/) and computes FID (eval/), which this layer may not import (tests/test_imports.py).
Stage modules are imported when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

from cm3leon_jax.config import load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub):
    """The `tokenizer` command; returns its subcommands, for eval/cli.py's `eval-image`."""
    tok = sub.add_parser("tokenizer", help="train and evaluate tokenizers").add_subparsers(
        dest="tokenizer_command", required=True)
    p = with_config(tok.add_parser("train-image", help="train the VQ-GAN image tokenizer "
                                   "on shapes images"))
    p.add_argument("--workdir", required=True, help="output: image_tokenizer/, PNG, metrics")
    p.set_defaults(fn=train_image)
    return tok


def train_image(args) -> None:
    from cm3leon_jax.tokenizers.image_train import train_from_config  # heavy: deferred (--help)

    cfg = load_config(args.config, args.overrides)
    _, s = train_from_config(cfg, args.workdir)
    v = cfg.vqgan
    print(f"image tokenizer: {v.resolution}x{v.resolution} -> {v.tokens_per_image} tokens from "
          f"{v.codebook_size} codes; {s['steps']} steps on {s['train_images']} shapes images "
          f"in {s['train_seconds']:.0f}s")
    print(f"held-out PSNR {s['psnr']:.2f} dB on {s['eval_images']} images, codebook usage "
          f"{s['codebook_usage']:.1%}, {s['codes_restarted']} dead codes restarted")
    print(f"saved {args.workdir}/image_tokenizer, reconstructions.png, metrics.jsonl")
