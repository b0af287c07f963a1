"""The demo's image tokenizer, trained once and shipped with the package.

CM3Leon trains its language model on a pretrained image tokenizer (Make-A-Scene's VQ-GAN,
paper_spec §4); the demo does the same with the tokenizer `configs/demo.yaml` trains on
its shapes scenes, so `make demo` spends its minutes on the model rather than on seven
minutes of VQ-GAN training that give the same bytes every time (bench/vq_demo.py --package
retrains it and compares them). `trained.json` beside the weights says how it was made and
what it scores on held-out scenes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cm3leon_jax.config import VQGANConfig
from cm3leon_jax.config.loader import ConfigError, build

DIRECTORY = Path(__file__).with_name("image_tokenizer")


def provenance() -> dict:
    """trained.json: the command that reproduces it, its data, scores and digest."""
    return json.loads((DIRECTORY / "trained.json").read_text())


def config() -> VQGANConfig:
    return build(VQGANConfig, json.loads((DIRECTORY / "vqgan.json").read_text()), "vqgan")


def check_matches(vqgan: VQGANConfig) -> None:
    """Refuse a `vqgan` section the packaged tokenizer was not trained with, naming the key:
    the data would be tokenized by one model while the config described another."""
    have = dataclasses.asdict(config())
    said = dataclasses.asdict(vqgan)
    differ = [k for k in have if have[k] != said[k]]
    if differ:
        k = differ[0]
        raise ConfigError(f"demo.image_tokenizer=packaged is configs/demo.yaml's tokenizer, with "
                          f"vqgan.{k}={have[k]!r}, but vqgan.{k} is {said[k]!r}; set "
                          "demo.image_tokenizer=train to train one with this vqgan section")
