"""`cm3leon fit-scaling RUNS_DIR`: fit L = a * (x / x0)^(-b) + c to a sweep's held-out
losses, for compute (x = training FLOPs, points on the compute frontier) and for size
(x = non-embedding parameters: every run at the same token count, and every run at the end
of its budget), with the parameters' standard errors from scipy's `curve_fit` covariance.

Frontier: the evaluations (grid, fixed-token and final, plan.py) that no evaluation with
less or equal compute beats. The L(C) fit uses the frontier from the smallest run's whole
budget on: below it no run has
finished even the smallest budget, so those points measure the start of training (warmup,
the first steps) rather than what a size can reach. x0 is the smallest fitted x, so `a` is
the reducible loss at the first fitted point. The runs directory and the output may be on
cloud storage (storage.py).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import yaml
from scipy.optimize import curve_fit

from cm3leon_jax import storage
from cm3leon_jax.scaling.plot import plot_compute, plot_params
from cm3leon_jax.scaling.sweep import EVALS, RUN, SPEC, read_evals

METRICS = ("loss", "text_loss", "image_loss")
MIN_POINTS = 4  # three parameters and at least one degree of freedom


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    x0: float
    points: int

    def __call__(self, x):
        return power_law(np.asarray(x, np.float64) / self.x0, self.a, self.b, self.c)

    def describe(self, var: str) -> str:
        return (f"b = {self.b:.4f} ± {self.b_err:.4f}   a = {self.a:.4f} ± {self.a_err:.4f}   "
                f"c = {self.c:.4f} ± {self.c_err:.4f}   ({var}0 = {self.x0:.4g}, "
                f"{self.points} points)")


def power_law(u, a, b, c):
    return a * np.power(u, -b) + c


def fit_power_law(x, y) -> PowerLawFit:
    """Least-squares fit of y = a (x/x0)^-b + c with a > 0, b > 0, 0 <= c < min(y)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < MIN_POINTS:
        raise ValueError(f"{len(x)} points: fitting a, b, c needs at least {MIN_POINTS}")
    if np.any(x <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("x must be > 0 and y finite")
    x0 = float(x.min())
    u = x / x0
    c0 = 0.5 * float(y.min())
    slope, intercept = np.polyfit(np.log(u), np.log(y - c0), 1)  # start from c = c0
    p0 = (math.exp(intercept), max(-slope, 1e-3), c0)
    hi = (np.inf, 10.0, float(y.min()))
    p, cov = curve_fit(power_law, u, y, p0=p0, bounds=((0.0, 0.0, 0.0), hi), maxfev=20000)
    err = np.sqrt(np.diag(cov))
    return PowerLawFit(*map(float, p), *map(float, err), x0=x0, points=len(x))


# --- reading a sweep ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunResult:
    name: str
    params: int
    steps: int
    tokens_per_step: int
    flops_per_token: float
    evals: list[dict]  # eval.jsonl records, by step

    @property
    def budget_flops(self) -> float:
        return self.steps * self.tokens_per_step * self.flops_per_token

    @property
    def complete(self) -> bool:
        return bool(self.evals) and self.evals[-1]["step"] == self.steps


def load_runs(runs_dir: storage.PathLike) -> list[RunResult]:
    runs_dir = storage.path(runs_dir)
    if not (runs_dir / SPEC).exists():
        raise FileNotFoundError(f"{runs_dir / SPEC} is missing: not a `cm3leon sweep` "
                                "runs directory")
    out = []
    for info in sorted(runs_dir.glob(f"*/{RUN}")):
        meta = json.loads(info.read_text())
        evals = sorted(read_evals(info.parent), key=lambda r: r["step"])
        out.append(RunResult(meta["name"], meta["params"], meta["steps"],
                             meta["tokens_per_step"], meta["flops_per_token"], evals))
    if not out:
        raise FileNotFoundError(f"{runs_dir} holds no runs (*/{RUN}, */{EVALS})")
    return sorted(out, key=lambda r: r.params)


def frontier(runs: list[RunResult], metric: str) -> list[dict]:
    """The compute frontier: the evaluations no other evaluation beats with less or equal
    compute (the lowest loss reachable with at most C FLOPs, as C grows), with their run."""
    records = sorted(({**r, "run": run.name} for run in runs for r in run.evals
                      if r.get(metric) is not None), key=lambda r: (r["flops"], r[metric]))
    out, best = [], math.inf
    for r in records:
        if r[metric] < best:
            out.append(r)
            best = r[metric]
    return out


def fixed_token_points(runs: list[RunResult]) -> tuple[int, list[tuple[RunResult, dict]]]:
    """(step, [(run, its record at that step)]): the smallest budget, reached by every run."""
    step = min(r.steps for r in runs)
    return step, [(run, r) for run in runs for r in run.evals if r["step"] == step]


def _is_monotone(values: list[float], decreasing: bool) -> bool:
    pairs = zip(values, values[1:])
    return all(b < a for a, b in pairs) if decreasing else all(b >= a for a, b in pairs)


def _try_fit(x, y) -> PowerLawFit | str:
    try:
        return fit_power_law(x, y)
    except (ValueError, RuntimeError) as e:  # too few points, or curve_fit did not converge
        return f"not fitted: {e}"


def fit_scaling(runs_dir: storage.PathLike, out: storage.PathLike | None = None) -> dict:
    """Fit, print, write fit.json and the PNG plots; returns what fit.json holds."""
    runs_dir = storage.path(runs_dir)
    out = storage.path(out or runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(runs_dir)
    per_decade = yaml.safe_load((runs_dir / SPEC).read_text())["sweep"]["evals_per_decade"]

    print(f"{'run':<12} {'N (non-emb.)':>13} {'steps':>7} {'tokens':>11} {'FLOPs':>10} "
          f"{'loss':>7} {'text':>7} {'image':>7}")
    for run in runs:
        last = run.evals[-1] if run.evals else {}
        flag = "" if run.complete else "  (incomplete)"
        print(f"{run.name:<12} {run.params:>13,} {last.get('step', 0):>7} "
              f"{last.get('tokens', 0):>11,} {last.get('flops', 0):>10.3g} "
              + " ".join(f"{_num(last.get(m)):>7}" for m in METRICS) + flag)

    report: dict = {"runs_dir": str(runs_dir), "evals_per_decade": per_decade,
                    "runs": [{"name": r.name, "params": r.params, "steps": r.steps,
                              "complete": r.complete, "final": r.evals[-1] if r.evals else None}
                             for r in runs], "compute": {}, "params": {}}
    sizes = {r.name: r.params for r in runs}
    fits_c, fits_n, fronts = {}, {}, {}
    c_fit = min(r.budget_flops for r in runs) * (1 - 1e-9)
    report["compute"]["fit_from_flops"] = c_fit
    for metric in METRICS:
        front = frontier(runs, metric)
        fronts[metric] = front
        used = [p for p in front if p["flops"] >= c_fit]
        fit = _try_fit([p["flops"] for p in used], [p[metric] for p in used])
        fits_c[metric] = fit
        report["compute"][metric] = {
            "frontier": [{"flops": p["flops"], metric: p[metric], "run": p["run"],
                          "fitted": p["flops"] >= c_fit} for p in front],
            "size_grows_along_frontier": _is_monotone([sizes[p["run"]] for p in front], False),
            "final_loss_falls_with_size": _is_monotone(
                [r.evals[-1][metric] for r in runs if r.complete], True),
            "fit": dataclasses.asdict(fit) if isinstance(fit, PowerLawFit) else fit}
    step, fixed = fixed_token_points(runs)
    tokens = step * runs[0].tokens_per_step
    series = {f"at {tokens:,} tokens (step {step})": fixed,
              "at the end of each budget (tokens = "
              f"{report_ratio(runs)} x N)": [(r, r.evals[-1]) for r in runs if r.complete]}
    fits_n = {}
    report["params"] = {"fixed_tokens": {"tokens": tokens, "step": step}, "budget_end": {}}
    for (label, points), key in zip(series.items(), ("fixed_tokens", "budget_end")):
        fits_n[label] = {}
        for metric in METRICS:
            pts = [(run.params, r[metric]) for run, r in points if r.get(metric) is not None]
            fit = _try_fit([n for n, _ in pts], [v for _, v in pts])
            fits_n[label][metric] = fit
            report["params"][key][metric] = {
                "points": [{"params": n, metric: v} for n, v in pts],
                "loss_falls_with_size": _is_monotone([v for _, v in pts], True),
                "fit": dataclasses.asdict(fit) if isinstance(fit, PowerLawFit) else fit}

    print(f"\nL(C) = a (C/C0)^-b + c on the compute frontier (evaluations every "
          f"{10 ** (1 / per_decade):.3g}x FLOPs), fitted from C = {c_fit:.3g} (the smallest "
          "run's budget):")
    for metric in METRICS:
        r = report["compute"][metric]
        print(f"  {metric:<11} {_describe(fits_c[metric], 'C')}")
        print(f"  {'':<11} {len(r['frontier'])} frontier points; the frontier's size never "
              f"shrinks as C grows: {_yes(r['size_grows_along_frontier'])}; loss at the end "
              f"of each budget falls with size: {_yes(r['final_loss_falls_with_size'])}")
    for (label, _), key in zip(series.items(), ("fixed_tokens", "budget_end")):
        print(f"\nL(N) = a (N/N0)^-b + c {label}, N = non-embedding parameters:")
        for metric in METRICS:
            r = report["params"][key][metric]
            print(f"  {metric:<11} {_describe(fits_n[label][metric], 'N')}")
            print(f"  {'':<11} loss falls with size: {_yes(r['loss_falls_with_size'])}")

    plot_compute(runs, fronts, fits_c, c_fit, out / "scaling_compute.png")
    plot_params(series, fits_n, out / "scaling_params.png")
    (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out / 'fit.json'}, {out / 'scaling_compute.png'}, "
          f"{out / 'scaling_params.png'}")
    return report


def report_ratio(runs: list[RunResult]) -> str:
    """The budget's tokens per parameter, read back from the runs (for labels)."""
    run = runs[0]
    return f"{run.steps * run.tokens_per_step / run.params:.3g}"


def _describe(fit, var: str) -> str:
    return fit.describe(var) if isinstance(fit, PowerLawFit) else fit


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"
