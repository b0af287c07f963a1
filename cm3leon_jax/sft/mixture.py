"""The SFT task mixture: per-task sampling weights with CM3Leon's up/down-sampling bounds.

CM3Leon (App. E.1) balances its SFT datasets by up- and down-sampling with thresholds 3 and
0.3. Here: a task's natural share is its size over the total; its target share comes from
the config (uniform when none is given); the sampling ratio target / natural is clipped to
[min_ratio, max_ratio] = [0.3, 3], so no task is repeated more than 3x (relative to its
natural rate) nor cut below 0.3x; the clipped rates, renormalised, are the weights.

Draw k of the mixture is a pure function of (seed, k): random access, any process count.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cm3leon_jax.sft.jsonl import read_sft_jsonl


@dataclasses.dataclass(frozen=True)
class TaskShare:
    task: str
    size: int
    natural: float  # size / total
    target: float  # wanted share before the bounds
    ratio: float  # sampling rate relative to natural, after clipping to the bounds
    weight: float  # the share actually sampled


def mixture_weights(sizes: dict[str, int], targets: dict[str, float] | None = None,
                    max_ratio: float = 3.0, min_ratio: float = 0.3) -> list[TaskShare]:
    """Per-task shares (in `sizes` order) from the task sizes and the wanted shares."""
    if not sizes:
        raise ValueError("the mixture needs at least one task")
    if not 0 < min_ratio <= 1 <= max_ratio:
        raise ValueError(f"need 0 < min_ratio={min_ratio} <= 1 <= max_ratio={max_ratio}")
    for task, n in sizes.items():
        if n <= 0:
            raise ValueError(f"task {task!r} has size {n}; every task needs examples")
    targets = dict.fromkeys(sizes, 1.0) if targets is None else targets
    if set(targets) != set(sizes):
        raise ValueError(f"target tasks {sorted(targets)} differ from the tasks {sorted(sizes)}")
    if any(t < 0 for t in targets.values()) or sum(targets.values()) <= 0:
        raise ValueError(f"target weights {targets} must be >= 0 with a positive sum")
    total, t_total = sum(sizes.values()), sum(targets.values())
    natural = {k: n / total for k, n in sizes.items()}
    target = {k: targets[k] / t_total for k in sizes}
    ratio = {k: float(np.clip(target[k] / natural[k], min_ratio, max_ratio)) if target[k] else 0.0
             for k in sizes}
    mass = {k: natural[k] * ratio[k] for k in sizes}
    m_total = sum(mass.values())
    return [TaskShare(k, sizes[k], natural[k], target[k], ratio[k], mass[k] / m_total)
            for k in sizes]


def mixture_draw(shares: list[TaskShare], seed: int, k: int) -> tuple[str, int]:
    """Draw k of the mixture: (task, example index in [0, size))."""
    rng = np.random.default_rng([seed, k])
    weights = np.asarray([s.weight for s in shares])
    t = int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right"))
    t = min(t, len(shares) - 1)
    return shares[t].task, int(rng.integers(shares[t].size))


def mixture_report(shares: list[TaskShare], seed: int | None = None, draws: int = 0) -> str:
    """A table of each task's size, natural, target and sampled share (and, with `draws`,
    the share realised by the first `draws` draws of `seed`)."""
    realised = {}
    if draws:
        tasks = [mixture_draw(shares, seed, k)[0] for k in range(draws)]
        realised = {s.task: tasks.count(s.task) / draws for s in shares}
    head = f"{'task':<10} {'size':>9} {'natural':>8} {'target':>8} {'ratio':>6} {'weight':>8}"
    lines = [head + (f" {'drawn':>8}" if draws else "")]
    for s in shares:
        line = (f"{s.task:<10} {s.size:>9} {s.natural:>8.2%} {s.target:>8.2%} {s.ratio:>6.2f} "
                f"{s.weight:>8.2%}")
        lines.append(line + (f" {realised[s.task]:>8.2%}" if draws else ""))
    return "\n".join(lines)


def config_shares(sft) -> list[TaskShare]:
    """The mixture an `SFTConfig` describes: shapes sizes from the config, JSONL sizes
    counted per task over `sft.files` (every record checked)."""
    if sft.source == "shapes":
        sizes = dict(zip(sft.tasks, sft.sizes))
    else:
        counts = dict.fromkeys(sft.tasks, 0)
        for path in sft.files:
            for record in read_sft_jsonl(path):
                if record["task"] not in counts:  # nothing is dropped silently
                    raise ValueError(f"{record['_where']}: task {record['task']!r} is not in "
                                     f"sft.tasks {list(sft.tasks)}")
                counts[record["task"]] += 1
        missing = [t for t, n in counts.items() if not n]
        if missing:
            raise ValueError(f"sft.tasks {missing} have no records in sft.files {list(sft.files)}")
        sizes = counts
    targets = dict(zip(sft.tasks, sft.weights)) if sft.weights else None
    return mixture_weights(sizes, targets, sft.max_ratio, sft.min_ratio)
