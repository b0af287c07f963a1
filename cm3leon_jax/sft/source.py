"""The configured SFT data in mixture order: `SFTSource(cfg.sft, resolution)[k]` is draw k.

Random access (a grain data source): draw k picks a task and an example index from the
mixture weights (`mixture.mixture_draw`), then builds that example from the shapes suite
or from the task's JSONL records (checked when the source is opened).
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.sft.jsonl import jsonl_example, read_sft_jsonl
from cm3leon_jax.sft.mixture import config_shares, mixture_draw
from cm3leon_jax.sft.shapes_suite import ShapesSFT
from cm3leon_jax.sft.tasks import SFTExample, tokenize_example


class SFTSource:
    def __init__(self, sft, resolution: int):
        self.cfg, self.resolution = sft, resolution
        self.shares = config_shares(sft)
        if sft.source == "shapes":
            self.suite = ShapesSFT(sft.seed, resolution, sft.max_objects)
        else:
            records = [r for f in sft.files for r in read_sft_jsonl(f)]
            self.records = {t: [r for r in records if r["task"] == t] for t in sft.tasks}

    def __len__(self) -> int:  # an epoch: as many draws as examples (drawn with replacement)
        return sum(s.size for s in self.shares)

    def __getitem__(self, k: int) -> SFTExample:
        task, index = mixture_draw(self.shares, self.cfg.seed, int(k))
        if self.cfg.source == "shapes":
            return self.suite.example(task, "train", index)
        return jsonl_example(self.records[task][index], self.resolution, int(k))

    def example_key(self, k: int) -> tuple[str, int] | None:
        """(task, index) of draw k when that alone fixes its example (shapes); None for
        JSONL, whose phrasing also follows k."""
        if self.cfg.source != "shapes":
            return None
        return mixture_draw(self.shares, self.cfg.seed, int(k))

    def tokens(self, k: int, text, image, vocab) -> np.ndarray:
        """Draw k as vocabulary ids, through the prepared text and image tokenizers."""
        return tokenize_example(self[k], text.encode, image.encode, vocab)
