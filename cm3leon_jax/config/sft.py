"""Section `sft`: the supervised fine-tuning tasks, their sources and mixture, how `cm3leon
sft` trains on them and how `cm3leon eval-sft` scores them (cm3leon_jax/sft/)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from cm3leon_jax.config.loader import ConfigError

SHAPES_TASKS = ("caption", "vqa", "edit", "grounding", "control")  # the built-in suite's
TASKS = (*SHAPES_TASKS, "ocr", "scienceqa")  # CM3Leon Table 5's task kinds (the last: JSONL)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning data (cm3leon_jax/sft/): tasks, sources, mixture."""
    source: Literal["shapes", "jsonl"] = "shapes"  # the built-in suite or JSONL files
    tasks: tuple[str, ...] = SHAPES_TASKS  # tasks trained on (and evaluated)
    sizes: tuple[int, ...] = (2000, 4000, 2000, 2000, 2000)  # shapes: train examples per task
    files: tuple[str, ...] = ()  # jsonl: SFT files (records carry their task)
    weights: tuple[float, ...] = ()  # wanted share per task (tasks order); empty: uniform
    max_ratio: float = 3.0  # up-sampling bound (CM3Leon App. E.1)
    min_ratio: float = 0.3  # down-sampling bound
    seed: int = 0  # shapes scenes, phrasings and the mixture draws
    resolution: Optional[int] = None  # shapes: pixels per side; null: the image tokenizer's
    max_objects: int = 3  # shapes: 1..max_objects objects per scene
    loss: Literal["cm3", "response"] = "cm3"  # CM3 objective (CM3Leon) or response only (Chameleon)
    tokenizers: Optional[str] = None  # dir with text_tokenizer.model, image_tokenizer/; null: the init's
    eval_examples: int = 64  # cm3leon eval-sft: held-out shapes examples per task

    def check(self) -> None:
        if not self.tasks:
            raise ConfigError("sft.tasks: give at least one task")
        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(f"sft.tasks: {task!r} is not one of {list(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"sft.tasks={list(self.tasks)} names a task twice")
        if self.source == "shapes":
            other = [t for t in self.tasks if t not in SHAPES_TASKS]
            if other:
                raise ConfigError(f"sft.tasks: {other} come from JSONL files only (the shapes "
                                  f"suite makes {list(SHAPES_TASKS)}); set sft.source=jsonl")
            if len(self.sizes) != len(self.tasks):
                raise ConfigError(f"sft.sizes has {len(self.sizes)} entries for "
                                  f"{len(self.tasks)} sft.tasks")
            if any(n <= 0 for n in self.sizes):
                raise ConfigError(f"sft.sizes={list(self.sizes)}: every size must be > 0")
        if self.source == "jsonl" and not self.files:
            raise ConfigError("sft.files: the jsonl source needs at least one file")
        if self.weights:
            if len(self.weights) != len(self.tasks):
                raise ConfigError(f"sft.weights has {len(self.weights)} entries for "
                                  f"{len(self.tasks)} sft.tasks")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"sft.weights={list(self.weights)} must be >= 0 with a "
                                  "positive sum")
        if not 0 < self.min_ratio <= 1:
            raise ConfigError(f"sft.min_ratio={self.min_ratio} must be in (0, 1]")
        if self.max_ratio < 1:
            raise ConfigError(f"sft.max_ratio={self.max_ratio} must be >= 1")
        if self.resolution is not None and self.resolution < 24:
            raise ConfigError(f"sft.resolution={self.resolution}: shapes needs >= 24 pixels")
        if not 1 <= self.max_objects <= 9:
            raise ConfigError(f"sft.max_objects={self.max_objects} must be in [1, 9]")
        if self.tokenizers is not None and not self.tokenizers.strip():
            raise ConfigError("sft.tokenizers must be a directory or null")
        if self.eval_examples < 2:
            raise ConfigError(f"sft.eval_examples={self.eval_examples} must be >= 2 (chance "
                              "compares each example with the others)")
