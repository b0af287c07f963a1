"""Sections `optimizer`, `train` and `fault`: AdamW and its schedule, the training run, and
what the loop does about bad steps."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal, Optional

from cm3leon_jax.config.loader import ConfigError, nonnegative, positive


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 6e-4  # peak learning rate
    warmup_steps: int = 100  # linear from 0; the paper uses 1500 of a much longer run
    decay_steps: Optional[int] = None  # schedule length; null: train.steps
    final_lr_ratio: float = 0.1  # the schedule ends at this fraction of the peak
    schedule: Literal["linear", "cosine", "wsd"] = "linear"  # decay after warm-up; wsd: flat, then linear
    decay_fraction: Optional[float] = None  # wsd: share of the schedule spent decaying, (0, 1]
    b1: float = 0.9  # AdamW beta 1
    b2: float = 0.95  # AdamW beta 2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled, on matrices and embeddings (not QK-norm scales)
    clip_norm: float = 1.0  # global gradient-norm clip; 0: off

    def check(self) -> None:
        positive("optimizer", self, "lr", "b1", "b2", "eps", "decay_steps")
        nonnegative("optimizer", self, "warmup_steps", "weight_decay", "clip_norm")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"optimizer.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        if not (0 < self.b1 < 1 and 0 < self.b2 < 1):
            raise ConfigError(f"optimizer.b1={self.b1}, optimizer.b2={self.b2} must be in (0, 1)")
        if self.schedule != "wsd" and self.decay_fraction is not None:
            raise ConfigError(f"optimizer.decay_fraction={self.decay_fraction} is for "
                              f"optimizer.schedule=wsd only (it is {self.schedule}); delete it "
                              "or set optimizer.schedule=wsd")
        if self.schedule == "wsd" and self.decay_fraction is None:
            raise ConfigError("optimizer.schedule=wsd needs optimizer.decay_fraction, the share "
                              "of the schedule spent decaying, in (0, 1], e.g. 0.2")
        if self.decay_fraction is not None and not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optimizer.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.decay_steps is not None:
            self.check_length(self.decay_steps)

    def wsd_decay_steps(self, length: int) -> int:
        """Updates the wsd schedule spends decaying: the last decay_fraction of `length`."""
        return round(self.decay_fraction * length)

    def check_length(self, length: int) -> None:
        """The checks against the schedule length (decay_steps, else train.steps, a key of
        another section: `validate` and the schedule itself call this with it)."""
        if self.warmup_steps > length:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} exceeds the schedule "
                              f"length {length} (optimizer.decay_steps or train.steps)")
        if self.schedule != "wsd":
            return
        decay = self.wsd_decay_steps(length)
        if decay < 1:
            raise ConfigError(f"optimizer.decay_fraction={self.decay_fraction} of the schedule "
                              f"length {length} (optimizer.decay_steps or train.steps) is no "
                              "decay step; raise it")
        if self.warmup_steps > length - decay:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} runs into the wsd "
                              f"decay, the last {decay} of {length} steps (optimizer."
                              f"decay_fraction={self.decay_fraction}); lower one of them")


TRACKERS = ("tensorboard", "wandb")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # total optimizer updates of the run
    batch_size: int = 2048  # global sequences per update
    grad_accum: int = 1  # micro-batches per update
    seed: int = 0  # parameter init
    log_every: int = 1  # steps between metrics.jsonl / TensorBoard lines
    checkpoint_every: int = 1000  # steps between checkpoints (the last step always saves)
    checkpoint_minutes: Optional[float] = None  # also save this long after the last save; null: off
    keep_checkpoints: int = 3  # newest checkpoints kept
    peak_tflops: Optional[float] = None  # per device, for MFU; null: known devices only
    init_from: Optional[str] = None  # export or run dir: a fresh run starts from its weights
    eval_every: int = 0  # steps between held-out losses (metrics.jsonl eval_*); 0: none
    eval_batches: int = 4  # held-out batches of train.batch_size rows (fixed by the config)
    eval_dir: Optional[str] = None  # prepared held-out data; required for evals with data.dir
    allow_restart: bool = False  # checkpoints exist but none restores: start over from step 0
    profile_steps: Optional[tuple[int, ...]] = None  # [start, stop]: their trace in RUN/profile; null: off
    progress: Literal["bar", "log", "auto"] = "auto"  # bar | log (plain lines) | auto: bar on a terminal
    trackers: tuple[str, ...] = ("tensorboard",)  # besides metrics.jsonl (always): tensorboard, wandb
    wandb_project: str = "cm3leon"  # trackers with wandb: the W&B project (WANDB_MODE=offline works offline)

    def check(self) -> None:
        positive("train", self, "steps", "batch_size", "grad_accum", "log_every",
                 "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "peak_tflops",
                 "eval_batches")
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown or len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"train.trackers={list(self.trackers)}: each of {list(TRACKERS)} "
                              "at most once (metrics.jsonl is always written: resume and the "
                              "demo read it)")
        if "wandb" in self.trackers and importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.trackers lists wandb, which is not installed: pip install "
                              "'cm3leon_jax[wandb]' (or drop wandb from train.trackers)")
        p = self.profile_steps
        if p is not None and not (len(p) == 2 and 1 <= p[0] <= p[1] <= self.steps):
            raise ConfigError(f"train.profile_steps={list(p)} must be [start, stop] with "
                              f"1 <= start <= stop <= train.steps={self.steps}, e.g. [5, 7] "
                              "(step 1 includes the compile), or null")
        nonnegative("train", self, "eval_every")
        if self.eval_dir is not None and not self.eval_dir.strip():
            raise ConfigError("train.eval_dir must be a prepared directory, or null")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("train.init_from must be a run or export directory, or null")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum={self.grad_accum} does not divide "
                              f"train.batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    max_bad_steps: int = 5  # stop when more than this many updates in a row are skipped
    debug_nan_steps: tuple[int, ...] = ()  # test hook: these steps get NaN gradients
    log_example_ids: bool = False  # write each step's global example ids to metrics.jsonl

    def check(self) -> None:
        if self.max_bad_steps < 0:
            raise ConfigError(f"fault.max_bad_steps={self.max_bad_steps} must be >= 0")
        for s in self.debug_nan_steps:
            if s <= 0:
                raise ConfigError(f"fault.debug_nan_steps contains {s}: steps count from 1")
