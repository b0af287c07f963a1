import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cm3leon_jax.cli import main
from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.train import weights
from cm3leon_jax.train.heldout import Evaluator, heldout_batches
from cm3leon_jax.scaling.fit import fit_power_law, fit_scaling, load_runs
from cm3leon_jax.scaling.plan import eval_points, plan
from cm3leon_jax.scaling.sweep import read_evals, sweep
from conftest import CONFIGS, ROOT

CPU = CONFIGS / "scaling" / "cpu.yaml"
TWO = ("sweep.sizes=[{name: a, n_layers: 1, d_model: 16, n_heads: 2, d_ff: 64}, "
       "{name: b, n_layers: 1, d_model: 32, n_heads: 2, d_ff: 128}]")


# --- the fit -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_parameters(seed):
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 4), rng.uniform(0.1, 0.6), rng.uniform(0.5, 2)
    x = np.geomspace(1e9, 1e15, 25)
    clean = a * (x / x[0]) ** -b + c
    noisy = clean * (1 + 0.002 * rng.standard_normal(x.shape))
    fit = fit_power_law(x, noisy)
    assert fit.x0 == x[0] and fit.points == 25
    for name, true in (("a", a), ("b", b), ("c", c)):
        got, err = getattr(fit, name), getattr(fit, f"{name}_err")
        assert 0 < err < 0.1 * true
        assert abs(got - true) < 4 * err, (name, got, true, err)
    exact = fit_power_law(x, clean)
    assert (exact.a, exact.b, exact.c) == pytest.approx((a, b, c), rel=1e-6)
    np.testing.assert_allclose(exact(x), clean, rtol=1e-6)


def test_fit_needs_four_points():
    with pytest.raises(ValueError, match="3 points: fitting a, b, c needs at least 4"):
        fit_power_law([1.0, 2.0, 3.0], [3.0, 2.0, 1.5])


# --- the plan and its validation ---------------------------------------------------------

def test_eval_points_hit_the_compute_grid():
    rng = np.random.default_rng(0)
    for _ in range(300):
        fps = float(10 ** rng.uniform(3, 12))
        steps, warmup = int(rng.integers(2, 3000)), int(rng.integers(0, 20))
        per_decade = int(rng.integers(1, 8))
        fixed = int(rng.integers(1, steps + 1))
        points = eval_points(fps, steps, warmup, per_decade, fixed)
        got = [p.step for p in points]
        assert got == sorted(set(got)) and fixed in got and got[-1] == steps
        grid = [p for p in points if p.grid is not None]
        # every grid value reached after warmup is evaluated at the first step whose compute
        # is at least that value (two values may share a step: it carries the first)
        ks = [k for k in range(-100, 200)
              if max(warmup, 1) * fps <= 10 ** (k / per_decade) <= steps * fps]
        labels = [p.grid for p in grid]
        assert labels == sorted(set(labels)) and set(labels) <= set(ks)
        assert all(math.ceil(10 ** (k / per_decade) / fps - 1e-9) in got for k in ks)
        for p in grid:
            c = 10 ** (p.grid / per_decade)
            assert p.step * fps >= c * (1 - 1e-9) and (p.step - 1) * fps < c * (1 + 1e-9)


def test_shipped_sweeps_follow_the_budget_rule():
    for name, span in (("cpu.yaml", 30), ("paper.yaml", 30)):
        cfg = load_config(CONFIGS / "scaling" / name)
        runs = plan(cfg)
        assert len(runs) >= 5 and runs[-1].params / runs[0].params >= span
        assert [r.params for r in runs] == sorted(r.params for r in runs)
        tokens = cfg.train.batch_size * cfg.data.seq_len
        for r in runs:
            assert r.steps == math.ceil(cfg.sweep.tokens_per_param * r.params / tokens)
            assert r.cfg.train.steps == r.steps == r.cfg.optimizer.decay_steps
            assert r.evals[-1].step == r.steps
            assert runs[0].steps in [p.step for p in r.evals]


@pytest.mark.parametrize("overrides, message", [
    (["sweep.sizes=[]"], r"sweep.sizes has 0 entries: a sweep needs at least 2"),
    ([TWO.replace("name: b", "name: a")], r"sweep.sizes\[1\] \(a\): the name is already used"),
    ([TWO.replace("name: b", "name: b/c")], r"sweep.sizes\[1\].name='b/c': use letters"),
    ([TWO.replace("n_heads: 2, d_ff: 128", "n_heads: 3, d_ff: 128")],
     r"sweep.sizes\[1\] \(b\): model.n_heads=3 does not divide model.d_model=32"),
    ([TWO.replace(", d_ff: 128", "")], r"sweep.sizes\[1\]: missing key 'd_ff'"),
    ([TWO.replace("d_ff: 128", "d_ff: 128, width: 3")],
     r"unknown config key 'sweep.sizes\[1\].width'"),
    ([TWO.replace("d_ff: 128", "d_ff: 128, lr: -1")], r"\(b\): lr=-1.0 must be > 0"),
    ([TWO.replace("d_model: 32, n_heads: 2, d_ff: 128", "d_model: 16, n_heads: 2, d_ff: 64")],
     r"sweep.sizes\[1\] \(b\): 3,072 non-embedding parameters, the same as sweep.sizes\[0\]"),
    (["sweep.sizes=3"], r"sweep.sizes: expected a list"),
    (["sweep.tokens_per_param=0.5"], r"\(L1-d16\): the budget of 0.5 tokens x 3,072 parameters "
                                     r"is 3 steps of 8 x 64 tokens, not more than "
                                     r"optimizer.warmup_steps=5"),
    (["sweep.tokens_per_param=0"], r"sweep.tokens_per_param=0.0 must be > 0"),
    (["sweep.evals_per_decade=0"], r"sweep.evals_per_decade=0 must be >= 1"),
    (["train.eval_dir=/x"], r"train.eval_dir='/x' is set but data.dir is null"),
    (["sweep.eval_dir=/x"], r"train.eval_dir='/x' is set but data.dir is null"),  # old name
    (["data.dir=/x"], r"data.dir='/x' is set, so train.eval_dir must name"),
    (["optimizer.decay_steps=100"], r"optimizer.decay_steps=100: a sweep sets each run's"),
    ([TWO.replace("d_model: 32", "d_model: 20")],
     r"sweep.sizes\[1\] \(b\): model.d_model=20 is not divisible by mesh.fsdp=8"),
])
def test_bad_sweep_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CPU, overrides, num_devices=8)


def test_sweep_cli_refuses_a_plain_config(capsys, tmp_path):
    assert main(["sweep", "--config", str(CONFIGS / "tiny.yaml"), "--runs", str(tmp_path)]) == 2
    assert "has no sweep.sizes: not a sweep config" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- a micro sweep, interrupted and resumed ------------------------------------------------

MICRO = [TWO, "data.seq_len=32", "model.max_seq_len=32", "optimizer.warmup_steps=2",
         "sweep.tokens_per_param=0.5", "sweep.evals_per_decade=1", "train.eval_batches=1",
         "train.checkpoint_every=100", "train.log_every=1"]


@pytest.mark.multiprocess
def test_interrupted_micro_sweep_resumes(tmp_path):
    cfg = load_config(CPU, MICRO, num_devices=8)
    runs = plan(cfg)
    assert [r.steps for r in runs] == [6, 24]
    assert [[p.step for p in r.evals] for r in runs] == [[3, 6], [6, 13, 24]]

    # a real interruption: the CLI is killed once the first evaluation is on disk
    proc = subprocess.Popen([sys.executable, "-m", "cm3leon_jax.cli", "sweep", "--config",
                             str(CPU), "--runs", str(tmp_path), *MICRO], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not read_evals(tmp_path / "a") and time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_evals(tmp_path / "a")
    assert [r["step"] for r in before] in ([3], [3, 6])

    new = sweep(cfg, tmp_path)
    assert [r["step"] for r in new["a"]] == [3, 6][len(before):]
    for run in runs:
        records = read_evals(tmp_path / run.name)
        assert [r["step"] for r in records] == [p.step for p in run.evals]
        assert [r["grid"] for r in records] == [p.grid for p in run.evals]
        for r in records:
            assert r["tokens"] == r["step"] * 8 * 32 and r["params"] == run.params
            assert r["flops"] == pytest.approx(r["step"] * run.flops_per_step, rel=1e-12)
        assert records[-1]["loss"] < records[0]["loss"]
        # every step trained once, in order, whatever was lost to the kill
        steps = [json.loads(line)["step"]
                 for line in (tmp_path / run.name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, run.steps + 1))
    assert read_evals(tmp_path / "a")[:len(before)] == before
    # the recorded losses are those of the saved parameters on the held-out set
    b = runs[1]
    ev = Evaluator(b.cfg, heldout_batches(cfg))
    assert ev(weights.load(tmp_path / "b", 13, mesh=ev.mesh).params) == \
        {k: v for k, v in read_evals(tmp_path / "b")[1].items()
         if k not in ("step", "tokens", "flops", "grid", "params")}
    # finished: running it again trains and evaluates nothing; a changed sweep is refused
    assert sweep(cfg, tmp_path) == {"a": [], "b": []}
    with pytest.raises(ConfigError, match=r"sweep.yaml was written with train.eval_batches=1"):
        sweep(load_config(CPU, MICRO + ["train.eval_batches=3"], num_devices=8), tmp_path)

    # fit-scaling on it: the frontier holds exactly the evaluations that no evaluation with
    # less or equal compute beats; two sizes are too few for L(N)
    report = fit_scaling(tmp_path)
    records = [r for run in load_runs(tmp_path) for r in run.evals]
    pareto = sorted((r["flops"], r["loss"]) for r in records
                    if not any(o["flops"] <= r["flops"] and o["loss"] < r["loss"]
                               for o in records))
    assert [(p["flops"], p["loss"]) for p in report["compute"]["loss"]["frontier"]] == pareto
    for key in ("fixed_tokens", "budget_end"):
        assert report["params"][key]["loss"]["fit"].startswith("not fitted: 2 points")
    assert [p["loss"] for p in report["params"]["budget_end"]["loss"]["points"]] == \
        [read_evals(tmp_path / r.name)[-1]["loss"] for r in runs]
    for png in ("scaling_compute.png", "scaling_params.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
