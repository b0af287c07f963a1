"""Section `demo`: how `cm3leon demo` evaluates (held-out shapes scenes after source.size)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cm3leon_jax.config.loader import ConfigError


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    eval_scenes: int = 64  # held-out captions (text -> image) and images (image -> text)
    grid_rows: int = 8  # captions shown in each sample grid
    heldout_docs: int = 256  # scenes of another seed prepared as train.eval_dir (held-out loss)
    baseline: bool = False  # with data.k > 0, also train data.k=0 on the same rows and steps
    rerank_samples: int = 1  # > 1: also score best-of-this-many CFG samples by the dual encoder
    # (a prepare.image_tokenizer that is set wins over either)
    image_tokenizer: Literal["packaged", "train"] = "train"  # packaged: demo.yaml's recipe, trained once and reused; train: train one

    def check(self) -> None:
        for key in ("eval_scenes", "grid_rows", "heldout_docs", "rerank_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"demo.{key}={getattr(self, key)} must be >= 1")
