"""The plan of a scaling sweep: one training config per size, its token budget and the steps
at which it is evaluated. Pure config arithmetic: no arrays, no jax.

Budget rule (config/sweep.py, checked when the config loads): a run trains on
`sweep.tokens_per_param x N` tokens (N = non-embedding parameters, Kaplan et al.'s count),
rounded up to whole steps of train.batch_size x data.seq_len tokens; every run shares the
data, batch and sequence length, so step s is the same s x batch tokens for every size.
Evaluation points:

- the compute grid: each time a run's training FLOPs cross 10^(k / sweep.evals_per_decade)
  (after warmup), so all sizes are measured at the same compute values (the frontier);
- the fixed-token step: the smallest run's last step, reached by every run (L(N) at fixed D);
- the run's last step.
"""

from __future__ import annotations

import dataclasses
import math

from cm3leon_jax.config import Config
from cm3leon_jax.config.sweep import budget_steps, non_embedding_params, sized


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
    """The sweep's runs, smallest first (the sizes were checked when the config loaded)."""
    sizes = []
    for size in cfg.sweep.sizes:
        shaped = sized(cfg, size, 1)
        n = non_embedding_params(shaped)
        sizes.append((size, n, budget_steps(cfg, n)))
    sizes.sort(key=lambda x: x[1])
    fixed_step = min(steps for _, _, steps in sizes)
    vocab_size = cfg.vocab.build().size
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    runs = []
    for size, n, steps in sizes:
        rc = sized(cfg, size, steps)
        fpt = rc.model.flops_per_token(vocab_size, rc.data.seq_len)
        evals = eval_points(fpt * tokens_per_step, steps, rc.optimizer.warmup_steps,
                            cfg.sweep.evals_per_decade, fixed_step)
        runs.append(Run(size.name, rc, n, rc.model.param_counts(vocab_size)["total"], fpt,
                        tokens_per_step, steps, evals))
    return runs
