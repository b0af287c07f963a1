"""Log-log PNG plots of a sweep: every run's held-out loss against compute with the frontier
and its fit, and loss against size at a fixed token count with its fit. One panel per
metric (all tokens, text tokens, image tokens). Written through a stream, so anywhere
(local or cloud storage, storage.py)."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from cm3leon_jax import storage

TITLES = {"loss": "all tokens", "text_loss": "text tokens", "image_loss": "image tokens"}


def _figure(n: int):
    """A figure of n panels in a row (the object API: no pyplot state, no display)."""
    fig = Figure(figsize=(5 * n, 4.2))
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _log_axes(ax) -> None:
    """Log-log with decade labels on x and plain numbers on y (losses rarely span a decade,
    so y needs labelled minor ticks; fewer of them when the span is wide)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_ylim()
    if hi / lo >= 3:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.grid(True, which="both", alpha=0.3)


def _fit_label(fit, var: str) -> str:
    return (f"fit: {fit.a:.3g}·({var}/{fit.x0:.3g})^-{fit.b:.3f}±{fit.b_err:.3f} "
            f"+ {fit.c:.3f}")


def plot_compute(runs, fronts: dict, fits: dict, fit_from: float,
                 path: storage.PathLike) -> None:
    fig, axes = _figure(len(fronts))
    cmap = matplotlib.colormaps["viridis"]
    for ax, (metric, front) in zip(axes, fronts.items()):
        for i, run in enumerate(runs):
            pts = [(r["flops"], r[metric]) for r in run.evals if r.get(metric) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-", ms=3, lw=1, color=cmap(i / max(len(runs) - 1, 1)),
                        label=f"{run.name} (N={run.params:,})")
        used = [p for p in front if p["flops"] >= fit_from]
        early = [p for p in front if p["flops"] < fit_from]
        if used:
            ax.plot([p["flops"] for p in used], [p[metric] for p in used], "ks", ms=5,
                    label="frontier (fitted)")
        if early:
            ax.plot([p["flops"] for p in early], [p[metric] for p in early], "ks", ms=5,
                    mfc="none", label="frontier (before the smallest budget)")
        fit = fits[metric]
        if not isinstance(fit, str):
            xs = np.geomspace(fit.x0, max(p["flops"] for p in used), 200)
            ax.plot(xs, fit(xs), "r--", lw=1.5, label=_fit_label(fit, "C"))
        _log_axes(ax)
        ax.set(xlabel="training FLOPs C", ylabel="held-out loss (nats/token)",
               title=f"L(C), {TITLES[metric]}")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_params(series: dict, fits: dict, path: storage.PathLike) -> None:
    """`series`: label -> [(run, eval record)]; `fits`: label -> metric -> fit."""
    fig, axes = _figure(len(TITLES))
    styles = ("ko", "bs")
    for ax, metric in zip(axes, TITLES):
        for (label, points), style in zip(series.items(), styles):
            pts = [(run.params, r[metric]) for run, r in points if r.get(metric) is not None]
            if not pts:
                continue
            x, y = zip(*pts)
            ax.plot(x, y, style, label=label)
            fit = fits[label][metric]
            if not isinstance(fit, str):
                xs = np.geomspace(min(x), max(x), 200)
                ax.plot(xs, fit(xs), style[0] + "--", lw=1.2, label=_fit_label(fit, "N"))
        _log_axes(ax)
        ax.set(xlabel="non-embedding parameters N", ylabel="held-out loss (nats/token)",
               title=f"L(N), {TITLES[metric]}")
        ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: storage.PathLike) -> None:
    fig.tight_layout()
    with storage.path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
