"""Section `sweep` (`cm3leon sweep`, cm3leon_jax/scaling/): a family of model sizes trained
on the same data, each for a token budget proportional to its size.

The budget arithmetic lives here, next to its checks, because a bad size must fail when the
config is loaded: a run trains on `tokens_per_param x N` tokens (N = non-embedding
parameters, Kaplan et al.'s count), rounded up to whole steps of train.batch_size x
data.seq_len tokens. Functions take the whole (root) config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from cm3leon_jax.config.loader import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class SweepSize:
    """One model of a scaling sweep: its shape (over the `model` section) and its LR."""
    name: str  # the run's directory under the sweep's runs directory
    n_layers: int  # model.n_layers of this size
    d_model: int  # model.d_model of this size
    n_heads: int  # model.n_heads of this size
    d_ff: int  # model.d_ff of this size
    lr: Optional[float] = None  # peak learning rate; null: optimizer.lr


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """`cm3leon sweep`: a family of sizes trained on the same data (scaling/plan.py)."""
    sizes: tuple[SweepSize, ...] = ()  # empty: not a sweep config
    tokens_per_param: float = 20.0  # training tokens = this x non-embedding parameters
    evals_per_decade: int = 4  # evaluate when training FLOPs cross 10^(k/this)

    def check(self) -> None:
        """The section's own values; `check_sizes(cfg)` checks the sizes in the config."""
        if self.tokens_per_param <= 0:
            raise ConfigError(f"sweep.tokens_per_param={self.tokens_per_param} must be > 0")
        if self.evals_per_decade < 1:
            raise ConfigError(f"sweep.evals_per_decade={self.evals_per_decade} must be >= 1")


def sized(cfg, size: SweepSize, steps: int):
    """The base config with this size's shape and LR, trained and scheduled for `steps`."""
    model = dataclasses.replace(cfg.model, n_layers=size.n_layers, d_model=size.d_model,
                                n_heads=size.n_heads, d_ff=size.d_ff)
    lr = cfg.optimizer.lr if size.lr is None else size.lr
    opt = dataclasses.replace(cfg.optimizer, lr=lr, decay_steps=steps)
    return dataclasses.replace(cfg, model=model, optimizer=opt,
                               train=dataclasses.replace(cfg.train, steps=steps),
                               sweep=SweepConfig())


def non_embedding_params(cfg) -> int:
    return cfg.model.param_counts(cfg.vocab.build().size)["layers"]


def budget_steps(cfg, params: int) -> int:
    tokens = cfg.sweep.tokens_per_param * params
    return max(1, math.ceil(tokens / (cfg.train.batch_size * cfg.data.seq_len)))


def check_sizes(cfg) -> list[tuple[str, object]]:
    """Every problem of the `sweep` section, named by key and size; returns (where, run
    config) of every size for the caller to validate as a whole config."""
    s = cfg.sweep
    if len(s.sizes) < 2:
        raise ConfigError(f"sweep.sizes has {len(s.sizes)} entries: a sweep needs at least 2")
    if cfg.data.dir is not None and cfg.train.eval_dir is None:
        raise ConfigError(f"data.dir={cfg.data.dir!r} is set, so train.eval_dir must name the "
                          "prepared held-out data the sweep evaluates on (for example made "
                          "by `cm3leon prepare` with another seed)")
    if cfg.optimizer.decay_steps is not None:
        raise ConfigError(f"optimizer.decay_steps={cfg.optimizer.decay_steps}: a sweep sets "
                          "each run's schedule to its own budget; leave it null")
    names: dict[str, int] = {}
    counts: dict[int, str] = {}
    runs = []
    for i, size in enumerate(s.sizes):
        where = f"sweep.sizes[{i}] ({size.name})"
        if not NAME.match(size.name):
            raise ConfigError(f"sweep.sizes[{i}].name={size.name!r}: use letters, digits, "
                              "'_', '-', '.' (it names the run's directory)")
        if size.name in names:
            raise ConfigError(f"{where}: the name is already used by sweep.sizes"
                              f"[{names[size.name]}]")
        names[size.name] = i
        if size.lr is not None and size.lr <= 0:
            raise ConfigError(f"{where}: lr={size.lr} must be > 0")
        for key in ("n_layers", "d_model", "n_heads", "d_ff"):
            if getattr(size, key) <= 0:
                raise ConfigError(f"{where}: {key}={getattr(size, key)} must be > 0")
        n = non_embedding_params(sized(cfg, size, 1))
        if n in counts:
            raise ConfigError(f"{where}: {n:,} non-embedding parameters, the same as "
                              f"{counts[n]}; sizes must differ")
        counts[n] = where
        steps = budget_steps(cfg, n)
        if steps <= cfg.optimizer.warmup_steps:
            raise ConfigError(
                f"{where}: the budget of {s.tokens_per_param:g} tokens x {n:,} parameters is "
                f"{steps} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens, not "
                f"more than optimizer.warmup_steps={cfg.optimizer.warmup_steps}; raise "
                "sweep.tokens_per_param or lower the warmup")
        runs.append((where, sized(cfg, size, steps)))
    return runs
