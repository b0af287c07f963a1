"""`cm3leon fit-scaling RUNS_DIR`: fit L(C) = a·C^(−b) + c on the compute frontier and
L(N) = a·N^(−b) + c at fixed training tokens, with standard errors, and plot both.

The frontier at compute C is the lowest validation loss any size reaches at C; each run's
curve is interpolated linearly in log C at the points of a log grid (`points_per_decade`)
inside its own FLOP range. Fits are least squares (scipy `curve_fit`) with x scaled by its
smallest value, so `a` is the reducible loss at the smallest x; the uncertainties are the
square roots of the covariance diagonal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cm3leon_jax.config import ConfigError
from cm3leon_jax.scaling.sweep import EVALS, RUN_META, read_evals

METRICS = ("loss", "text_loss", "image_loss")


def power_law(x, a, b, c):
    return a * np.power(x, -b) + c


def fit_power_law(x, y) -> dict:
    """y ≈ a·(x/x0)^(−b) + c; needs at least 4 points (3 parameters + 1)."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 4:
        raise ConfigError(f"a power-law fit needs at least 4 points, got {len(x)}")
    x0 = x.min()
    p0 = (max(y.max() - y.min(), 1e-3), 0.3, 0.9 * y.min())
    popt, pcov = curve_fit(power_law, x / x0, y, p0=p0,
                           bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, y.min()]), maxfev=20000)
    err = np.sqrt(np.clip(np.diag(pcov), 0, None))
    resid = y - power_law(x / x0, *popt)
    return {"a": popt[0], "b": popt[1], "c": popt[2], "a_err": err[0], "b_err": err[1],
            "c_err": err[2], "x0": x0, "rmse": float(np.sqrt(np.mean(resid ** 2))),
            "points": len(x)}


def load_runs(runs_dir: str | Path) -> list[dict]:
    runs_dir = Path(runs_dir)
    runs = []
    for meta_path in sorted(runs_dir.glob(f"*/{RUN_META}")):
        meta = json.loads(meta_path.read_text())
        meta["evals"] = sorted(read_evals(meta_path.parent), key=lambda r: r["step"])
        if meta["evals"]:
            runs.append(meta)
    if len(runs) < 2:
        raise ConfigError(f"{runs_dir}: found {len(runs)} sweep runs with validation points "
                          f"({RUN_META} + {EVALS}); run `cm3leon sweep` first")
    return sorted(runs, key=lambda r: r["params"])


def frontier(runs: list[dict], metric: str, points_per_decade: int = 4) -> list[dict]:
    """[{flops, value, run, params}] along increasing compute."""
    lo = min(math.log10(r["evals"][0]["flops"]) for r in runs)
    hi = max(math.log10(r["evals"][-1]["flops"]) for r in runs)
    grid = np.arange(math.ceil(lo * points_per_decade), math.floor(hi * points_per_decade) + 1)
    out = []
    for k in grid:
        logc = k / points_per_decade
        best = None
        for r in runs:
            logf = np.log10([e["flops"] for e in r["evals"]])
            if len(logf) < 2 or not logf[0] <= logc <= logf[-1]:
                continue
            value = float(np.interp(logc, logf, [e[metric] for e in r["evals"]]))
            if best is None or value < best["value"]:
                best = {"flops": 10 ** logc, "value": value, "run": r["name"],
                        "params": r["params"]}
        if best is not None:
            out.append(best)
    return out


def at_fixed_tokens(runs: list[dict], metric: str) -> list[dict]:
    """Each size's validation value after the same number of training tokens."""
    tokens = runs[0]["fixed_tokens"]
    out = []
    for r in runs:
        match = [e for e in r["evals"] if abs(e["tokens"] - tokens) <= r["tokens_per_step"] / 2]
        if match:
            out.append({"params": r["params"], "value": match[0][metric], "run": r["name"],
                        "tokens": match[0]["tokens"]})
    return out


def fit_scaling(runs_dir: str | Path) -> dict:
    from cm3leon_jax.scaling.plot import plot_compute, plot_params

    runs_dir = Path(runs_dir)
    runs = load_runs(runs_dir)
    result = {"runs": [{k: r[k] for k in ("name", "params", "total_params", "steps")}
                       for r in runs], "compute": {}, "params": {}}
    for metric in METRICS:
        front = frontier(runs, metric)
        fixed = at_fixed_tokens(runs, metric)
        result["compute"][metric] = {
            "fit": fit_power_law([p["flops"] for p in front], [p["value"] for p in front]),
            "frontier": front}
        result["params"][metric] = {
            "fit": fit_power_law([p["params"] for p in fixed], [p["value"] for p in fixed]),
            "points": fixed, "tokens": runs[0]["fixed_tokens"]}
    front = result["compute"]["loss"]["frontier"]
    values = [p["value"] for p in front]
    sizes = [p["params"] for p in front]
    result["frontier_loss_falls"] = all(b < a for a, b in zip(values, values[1:]))
    result["frontier_size_grows"] = all(b >= a for a, b in zip(sizes, sizes[1:]))
    (runs_dir / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_compute(runs, result["compute"]["loss"], runs_dir / "scaling_compute.png")
    plot_params(result["params"]["loss"], runs_dir / "scaling_params.png")
    return result


def summary(result: dict) -> str:
    lines = []
    for kind, x in (("compute", "C"), ("params", "N")):
        for metric in METRICS:
            f = result[kind][metric]["fit"]
            lines.append(f"L({x}) {metric:<10} b = {f['b']:.3f} ± {f['b_err']:.3f}   "
                         f"c = {f['c']:.3f} ± {f['c_err']:.3f}   a = {f['a']:.3f} ± "
                         f"{f['a_err']:.3f} at {x}0 = {f['x0']:.3g}   "
                         f"({f['points']} points, rmse {f['rmse']:.4f})")
    lines.append(f"frontier: loss falls with compute: {result['frontier_loss_falls']}; "
                 f"best size grows with compute: {result['frontier_size_grows']}")
    return "\n".join(lines)
