"""Log–log PNG plots of a scaling sweep: the points measured and the fitted power laws."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _curve(fit, lo, hi):
    x = np.geomspace(lo, hi, 200)
    return x, fit["a"] * (x / fit["x0"]) ** (-fit["b"]) + fit["c"]


def plot_compute(runs: list[dict], compute: dict, path: str | Path) -> None:
    fig, ax = _axes()
    for r in runs:
        ax.plot([e["flops"] for e in r["evals"]], [e["loss"] for e in r["evals"]], "o-",
                ms=3, lw=1, label=f"{r['name']} ({r['params'] / 1e3:.0f}k)")
    front, fit = compute["frontier"], compute["fit"]
    ax.plot([p["flops"] for p in front], [p["value"] for p in front], "ks", ms=4,
            label="frontier")
    x, y = _curve(fit, front[0]["flops"], front[-1]["flops"])
    ax.plot(x, y, "k--", lw=1.5,
            label=f"fit: b = {fit['b']:.3f} ± {fit['b_err']:.3f}, c = {fit['c']:.2f}")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss vs compute (non-embedding params)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_params(params: dict, path: str | Path) -> None:
    fig, ax = _axes()
    pts, fit = params["points"], params["fit"]
    ax.plot([p["params"] for p in pts], [p["value"] for p in pts], "o", label="runs")
    x, y = _curve(fit, pts[0]["params"], pts[-1]["params"])
    ax.plot(x, y, "k--", lw=1.5,
            label=f"fit: b = {fit['b']:.3f} ± {fit['b_err']:.3f}, c = {fit['c']:.2f}")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation loss vs size at {params['tokens']:,} training tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
