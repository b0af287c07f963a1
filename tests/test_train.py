import json
import subprocess
import sys

import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.train.trainer import train
from cm3leon_jax.train.metrics import read_metrics
from conftest import CONFIGS, ROOT

STEPS = ["optimizer.decay_steps=60", "train.checkpoint_every=10"]


@pytest.mark.slow
def test_resumed_run_has_identical_losses(tiny, tmp_path):
    full = train(tiny("train.steps=60", *STEPS), tmp_path / "full").history
    first = train(tiny("train.steps=30", *STEPS), tmp_path / "split").history
    second = train(tiny("train.steps=60", *STEPS), tmp_path / "split").history
    assert [m["step"] for m in first] == list(range(1, 31))
    assert [m["step"] for m in second] == list(range(31, 61))
    assert [m["loss"] for m in first + second] == [m["loss"] for m in full]
    logged = read_metrics(tmp_path / "split")
    assert [m["loss"] for m in logged] == [m["loss"] for m in full]
    for m in logged:
        assert {"step", "loss", "text_loss", "image_loss", "grad_norm", "lr", "tokens_per_s",
                "real_tokens", "real_tokens_per_s", "mfu"} <= set(m)
        assert m["real_tokens"] == 8 * 128  # the synthetic rows have no padding
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["50", "60"]
    # nothing left to do: a third call trains no step
    assert train(tiny("train.steps=60", *STEPS), tmp_path / "split").history == []


@pytest.mark.slow
def test_loss_falls_and_both_modalities_are_logged(tiny, tmp_path):
    hist = train(tiny("train.steps=60"), tmp_path).history
    first, last = hist[0], hist[-1]
    assert last["loss"] < first["loss"] - 1.5
    assert last["text_loss"] < first["text_loss"] - 1.5
    assert last["image_loss"] < first["image_loss"] - 1.0
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_resume_refuses_a_different_model(tiny, tmp_path):
    train(tiny("train.steps=2", "optimizer.warmup_steps=1"), tmp_path)
    with pytest.raises(ConfigError, match=r"model.d_model=64 but the config says 128"):
        train(tiny("train.steps=4", "optimizer.warmup_steps=1", "model.d_model=128"), tmp_path)


@pytest.mark.multiprocess
def test_params_cli_json():
    nominal = {"cm3leon_350m": 350e6, "cm3leon_760m": 760e6, "cm3leon_7b": 7e9}
    for name, n in nominal.items():
        out = subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", "params", "--config",
                              str(CONFIGS / f"{name}.yaml"), "--json"],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        report = json.loads(out.stdout)
        assert set(report) == {"params", "flops_per_token", "state_bytes"}
        assert abs(report["params"] / n - 1) < 0.1
        # float32 params + two float32 AdamW moments, plus a few int32 step counters
        assert 0 < report["state_bytes"] - 12 * report["params"] <= 16


@pytest.mark.multiprocess
def test_cli_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", "params", "--config",
                          str(CONFIGS / "tiny.yaml"), "model.n_heads=3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "model.n_heads=3 does not divide model.d_model=64" in out.stderr
