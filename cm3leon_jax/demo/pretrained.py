"""The demo's image tokenizer: a recipe the package ships, trained once per checkout.

CM3Leon trains its language model on a pretrained image tokenizer (Make-A-Scene's VQ-GAN,
paper_spec §4); the demo does the same with the tokenizer `configs/demo.yaml` trains on
its shapes scenes. Its weights (2.9 MB) are not in git: the first demo that needs them
trains them (`build`, seven minutes: `prepare` training it as `demo.image_tokenizer=train`
does) into this package directory, and every later demo reuses them, so those demos spend
their minutes on the model. On CPU the recipe gives the same bytes every time;
`trained.json` beside the recipe (`vqgan.json`) records their digest, how they were made
(bench/vq_demo.py --package) and what they score on held-out scenes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from cm3leon_jax.config import Config, VQGANConfig
from cm3leon_jax.config.loader import ConfigError, build as build_section
from cm3leon_jax.data.prepare import prepare
from cm3leon_jax.layout import DataDir

DIRECTORY = Path(__file__).with_name("image_tokenizer")
WEIGHTS = "vqgan.npz"


def provenance() -> dict:
    """trained.json: the command that reproduces it, its data, scores and digest."""
    return json.loads((DIRECTORY / "trained.json").read_text())


def config() -> VQGANConfig:
    return build_section(VQGANConfig, json.loads((DIRECTORY / "vqgan.json").read_text()),
                         "vqgan")


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


def is_built(directory: Path = DIRECTORY) -> bool:
    return (directory / WEIGHTS).exists()


def build(cfg: Config, workdir: DataDir, directory: Path = DIRECTORY, log=print) -> str:
    """Train the tokenizer with `cfg` (prepare on `cfg.source` into `workdir`, the image
    tokenizer trained there) and keep its weights in `directory`; returns their sha256.
    The weights land under their final name last, so an interrupted build is not built."""
    check_matches(cfg.vqgan)
    log(f"demo: training the demo's image tokenizer once, into {directory} (later demos "
        "reuse it)")
    prepare(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, dir=str(workdir.root)),
        prepare=dataclasses.replace(cfg.prepare, image_tokenizer=None)))
    data = (workdir.image_tokenizer / WEIGHTS).read_bytes()
    partial = directory / (WEIGHTS + ".partial")
    partial.write_bytes(data)
    os.replace(partial, directory / WEIGHTS)
    digest = hashlib.sha256(data).hexdigest()
    recorded = provenance()["sha256"][WEIGHTS]
    log(f"demo: image tokenizer sha256 {digest[:16]}: " + (
        "the recorded bytes" if digest == recorded else
        f"not the recorded {recorded[:16]} (another jax or CPU; bench/vq_demo.py scores it)"))
    return digest
