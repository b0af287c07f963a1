"""Scaling sweep plan, resume, and the power-law fits (on curves with a known answer)."""

import json

import numpy as np
import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.scaling import fit
from cm3leon_jax.scaling.sweep import EVALS, RUN_META, eval_steps, plan, read_evals, sweep


def test_fit_recovers_a_known_power_law():
    rng = np.random.default_rng(0)
    for b, c in ((0.05, 2.0), (0.3, 1.2), (0.7, 0.5)):
        x = np.geomspace(1e9, 1e13, 12)
        y = 3.0 * (x / 1e9) ** (-b) + c
        f = fit.fit_power_law(x, y)
        assert abs(f["b"] - b) < 1e-6 and abs(f["c"] - c) < 1e-6 and abs(f["a"] - 3.0) < 1e-6
        noisy = fit.fit_power_law(x, y * (1 + 0.002 * rng.standard_normal(12)))
        assert abs(noisy["b"] - b) < 4 * noisy["b_err"] + 0.02 and noisy["b_err"] > 0
    with pytest.raises(ConfigError, match="at least 4 points"):
        fit.fit_power_law([1, 2, 3], [3, 2, 1])


def write_sweep(root, b=0.2, c=1.5):
    """Five fake runs whose loss is exactly L = f(N, C): bigger models are better at large
    C and worse at small C, as in real sweeps."""
    for i, n in enumerate([1e4, 3e4, 1e5, 3e5, 1e6]):
        d = root / f"run{i}"
        d.mkdir()
        tokens_per_step, fpt = 1024, 6 * n
        steps = int(10 * n / tokens_per_step)
        (d / RUN_META).write_text(json.dumps({
            "name": d.name, "params": n, "total_params": n, "flops_per_token": fpt,
            "steps": steps, "tokens_per_step": tokens_per_step, "fixed_tokens": 97 * 1024}))
        with open(d / EVALS, "w") as f:
            for s in sorted({*np.geomspace(1, steps, 12).astype(int).tolist(), 97}):
                C, T = fpt * tokens_per_step * s, tokens_per_step * s
                loss = c + 40 * n ** -b + 300 * T ** -0.5
                f.write(json.dumps({"run": d.name, "step": int(s), "params": n, "tokens": T,
                                    "flops": C, "loss": loss, "text_loss": loss + 0.1,
                                    "image_loss": loss - 0.1}) + "\n")


def test_fit_scaling_writes_fits_and_plots(tmp_path):
    write_sweep(tmp_path)
    result = fit.fit_scaling(tmp_path)
    # at fixed tokens the loss is exactly c + 40 N^-b + const
    f = result["params"]["loss"]["fit"]
    assert abs(f["b"] - 0.2) < 1e-4 and f["points"] == 5
    assert result["frontier_loss_falls"] and result["frontier_size_grows"]
    front = result["compute"]["loss"]["frontier"]
    assert len(front) >= 8 and front[0]["params"] < front[-1]["params"]
    assert 0 < result["compute"]["loss"]["fit"]["b"] < 1
    for name in ("fit.json", "scaling_compute.png", "scaling_params.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "scaling_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "L(C) loss" in fit.summary(result)


def test_plan_follows_the_budget_rule(tiny):
    cfg = tiny("sweep.sizes=1x16,2x32,1x48", "sweep.tokens_per_param=4")
    runs = plan(cfg)
    assert [r.name for r in runs] == ["1x16", "2x32", "1x48"]  # by parameters
    for r in runs:
        assert r.steps == -(-4 * r.params // 1024) and r.cfg.optimizer.decay_steps == r.steps
        steps = eval_steps(r, runs[0].steps * 1024, 4)
        assert steps[-1] == r.steps and runs[0].steps in steps  # the end, the fixed tokens
        for s in steps[:-1]:  # the rest: the step nearest a point of the log-FLOP grid
            if s != runs[0].steps:
                grid = 10 ** (round(4 * np.log10(r.flops(s))) / 4)
                assert abs(grid / r.flops(1) - s) <= 0.5 + 1e-9
    with pytest.raises(ConfigError, match="'2y32' is not LAYERSxD_MODEL"):
        tiny("sweep.sizes=2y32")
    with pytest.raises(ConfigError, match="1x20 needs >= 1 layer and a d_model divisible"):
        tiny("sweep.sizes=1x20")


def test_sweep_resumes_where_it_stopped(tiny, tmp_path):
    cfg = tiny("sweep.sizes=1x32", "sweep.tokens_per_param=0.5", "sweep.eval_rows=8",
               "sweep.evals_per_decade=1", "optimizer.warmup_steps=1")
    first = sweep(cfg, tmp_path)
    assert [r["step"] for r in first] == [3, 6]  # at 10^k FLOPs, and the end
    assert (tmp_path / "1x32" / "checkpoints" / "6").is_dir()
    for r in first:
        assert {"loss", "text_loss", "image_loss", "flops", "tokens", "params"} <= set(r)
        assert 0 < r["image_loss"] and 0 < r["text_loss"]
    # drop the last validation point: only it is redone
    path = tmp_path / "1x32" / EVALS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    again = sweep(cfg, tmp_path)
    assert [r["step"] for r in again] == [r["step"] for r in first]
    assert again[-1]["loss"] == pytest.approx(first[-1]["loss"], rel=1e-6)
    assert len(read_evals(tmp_path / "1x32")) == len(lines)
