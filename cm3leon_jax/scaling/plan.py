"""The plan of a scaling sweep: one training config per size, its token budget and the steps
at which it is evaluated. Pure config arithmetic: no arrays, no jax.

Budget rule: a run trains on `sweep.tokens_per_param x N` tokens (N = non-embedding
parameters, Kaplan et al.'s count), rounded up to whole steps of train.batch_size x
data.seq_len tokens; every run shares the data, batch and sequence length, so step s is the
same s x batch tokens for every size. Evaluation points:

- the compute grid: each time a run's training FLOPs cross 10^(k / sweep.evals_per_decade)
  (after warmup), so all sizes are measured at the same compute values (the frontier);
- the fixed-token step: the smallest run's last step, reached by every run (L(N) at fixed D);
- the run's last step.
"""

from __future__ import annotations

import dataclasses
import math
import re

from cm3leon_jax.config import Config, ConfigError, SweepConfig, SweepSize, validate
from cm3leon_jax.model.size import flops_per_token, param_counts

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class EvalPoint:
    step: int
    grid: int | None  # k of the compute grid point 10^(k / evals_per_decade), if one


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    cfg: Config  # the run's own config: train.steps and the LR schedule span the budget
    params: int  # non-embedding parameters (N)
    total_params: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    evals: tuple[EvalPoint, ...]

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def summary(self) -> dict:
        return {"name": self.name, "params": self.params, "total_params": self.total_params,
                "flops_per_token": self.flops_per_token, "tokens_per_step": self.tokens_per_step,
                "steps": self.steps, "n_layers": self.cfg.model.n_layers,
                "d_model": self.cfg.model.d_model, "lr": self.cfg.optimizer.lr,
                "eval_steps": [p.step for p in self.evals]}


def run_config(cfg: Config, size: SweepSize, steps: int) -> Config:
    """The base config with this size's shape and LR, trained and scheduled for `steps`."""
    model = dataclasses.replace(cfg.model, n_layers=size.n_layers, d_model=size.d_model,
                                n_heads=size.n_heads, d_ff=size.d_ff)
    lr = cfg.optimizer.lr if size.lr is None else size.lr
    opt = dataclasses.replace(cfg.optimizer, lr=lr, decay_steps=steps)
    return dataclasses.replace(cfg, model=model, optimizer=opt,
                               train=dataclasses.replace(cfg.train, steps=steps),
                               sweep=SweepConfig())


def non_embedding_params(cfg: Config) -> int:
    return param_counts(cfg.model, cfg.vocab.build().size)["layers"]


def budget_steps(cfg: Config, params: int) -> int:
    tokens = cfg.sweep.tokens_per_param * params
    return max(1, math.ceil(tokens / (cfg.train.batch_size * cfg.data.seq_len)))


def eval_points(flops_per_step: float, steps: int, warmup: int, per_decade: int,
                fixed_step: int) -> tuple[EvalPoint, ...]:
    """Grid points reached after warmup, plus the fixed-token step and the last step."""
    points: dict[int, int | None] = {}
    first = max(warmup, 1) * flops_per_step
    k = math.ceil(per_decade * math.log10(first) - 1e-9)
    while 10 ** (k / per_decade) <= steps * flops_per_step * (1 + 1e-12):
        step = min(steps, max(1, math.ceil(10 ** (k / per_decade) / flops_per_step - 1e-9)))
        points.setdefault(step, k)
        k += 1
    for step in (fixed_step, steps):
        points.setdefault(step, None)
    return tuple(EvalPoint(s, points[s]) for s in sorted(points))


def plan(cfg: Config) -> list[Run]:
    """The sweep's runs, smallest first (sizes are assumed checked by `check_sweep`)."""
    sizes = []
    for size in cfg.sweep.sizes:
        shaped = run_config(cfg, size, 1)
        n = non_embedding_params(shaped)
        sizes.append((size, n, budget_steps(cfg, n)))
    sizes.sort(key=lambda x: x[1])
    fixed_step = min(steps for _, _, steps in sizes)
    vocab_size = cfg.vocab.build().size
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    runs = []
    for size, n, steps in sizes:
        rc = run_config(cfg, size, steps)
        fpt = flops_per_token(rc.model, vocab_size, rc.data.seq_len)
        evals = eval_points(fpt * tokens_per_step, steps, rc.optimizer.warmup_steps,
                            cfg.sweep.evals_per_decade, fixed_step)
        runs.append(Run(size.name, rc, n, param_counts(rc.model, vocab_size)["total"], fpt,
                        tokens_per_step, steps, evals))
    return runs


def check_sweep(cfg: Config, num_devices: int | None = None) -> None:
    """Every problem of the `sweep` section, named by key and size, before any training."""
    s = cfg.sweep
    if len(s.sizes) < 2:
        raise ConfigError(f"sweep.sizes has {len(s.sizes)} entries: a sweep needs at least 2")
    if s.tokens_per_param <= 0:
        raise ConfigError(f"sweep.tokens_per_param={s.tokens_per_param} must be > 0")
    for key in ("evals_per_decade", "eval_batches"):
        if getattr(s, key) < 1:
            raise ConfigError(f"sweep.{key}={getattr(s, key)} must be >= 1")
    if cfg.data.dir is not None and s.eval_dir is None:
        raise ConfigError(f"data.dir={cfg.data.dir!r} is set, so sweep.eval_dir must name the "
                          "prepared held-out data (for example made by `cm3leon prepare` "
                          "with another seed)")
    if cfg.data.dir is None and s.eval_dir is not None:
        raise ConfigError(f"sweep.eval_dir={s.eval_dir!r} is set but data.dir is null: the "
                          "synthetic source holds out its own rows; set data.dir or drop "
                          "sweep.eval_dir")
    if cfg.optimizer.decay_steps is not None:
        raise ConfigError(f"optimizer.decay_steps={cfg.optimizer.decay_steps}: a sweep sets "
                          "each run's schedule to its own budget; leave it null")
    names: dict[str, int] = {}
    counts: dict[int, str] = {}
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
        shaped = run_config(cfg, size, 1)
        n = non_embedding_params(shaped)
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
        try:
            validate(run_config(cfg, size, steps), num_devices)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
