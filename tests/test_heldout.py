"""Held-out losses during training (`train.eval_every`): where they are logged, that they
are the losses of the saved parameters, and that the mesh does not change them."""

import jax
import numpy as np
import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.train import weights
from cm3leon_jax.train.heldout import Evaluator, heldout_batches
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.state import create_state, state_layout
from cm3leon_jax.train.trainer import train

EVAL_KEYS = {"eval_loss", "eval_text_loss", "eval_image_loss"}


@pytest.mark.slow
def test_eval_every_logs_the_saved_parameters_losses(tiny, tmp_path):
    cfg = tiny("train.steps=25", "train.eval_every=10", "train.eval_batches=2",
               "train.log_every=4", "train.checkpoint_every=10", "train.keep_checkpoints=5")
    history = train(cfg, tmp_path).history
    logged = read_metrics(tmp_path)
    evaluated = [m["step"] for m in logged if EVAL_KEYS <= set(m)]
    assert evaluated == [10, 20, 25]  # every 10 steps and the last
    assert [m["step"] for m in logged] == [4, 8, 10, 12, 16, 20, 24, 25]
    assert not any(EVAL_KEYS & set(m) for m in logged if m["step"] not in evaluated)
    assert [m["step"] for m in history if "eval_loss" in m] == evaluated
    # the logged losses are those of the checkpointed parameters on the fixed held-out set
    ev = Evaluator(cfg, heldout_batches(cfg))
    for step in evaluated:
        want = ev(weights.load(tmp_path, step, mesh=ev.mesh).params)
        got = next(m for m in logged if m["step"] == step)
        assert {k: got[f"eval_{k}"] for k in ("loss", "text_loss", "image_loss")} == \
            {k: want[k] for k in ("loss", "text_loss", "image_loss")}
    losses = [next(m for m in logged if m["step"] == s)["eval_loss"] for s in evaluated]
    assert losses[-1] < losses[0]


def test_evaluation_is_the_same_on_1_and_8_devices(tiny):
    cfg = tiny("train.eval_batches=3")
    batches = heldout_batches(cfg)
    one = Evaluator(cfg, batches, devices=jax.devices()[:1])
    eight = Evaluator(cfg, batches)
    assert eight.mesh.devices.size == 8 and one.mesh.devices.size == 1
    tx, _, shardings = state_layout(cfg, one.mesh)
    with jax.set_mesh(one.mesh):
        params = jax.device_get(create_state(cfg, tx, shardings).params)
    a, b = one(params), eight(params)
    assert a["text_tokens"] == b["text_tokens"] and a["image_tokens"] == b["image_tokens"]
    for k in ("loss", "text_loss", "image_loss"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    # with train.grad_accum the held-out batches go through in micro-batches: same sums
    c = Evaluator(tiny("train.eval_batches=3", "train.grad_accum=2"), batches,
                  devices=jax.devices()[:4])(params)
    assert c["text_tokens"] == b["text_tokens"]
    for k in ("loss", "text_loss", "image_loss"):
        np.testing.assert_allclose(c[k], b[k], rtol=1e-6)


def test_held_out_batches_are_fixed_and_never_trained(tiny):
    cfg = tiny("train.eval_batches=2")
    a, b = heldout_batches(cfg), heldout_batches(cfg)
    assert len(a) == 2 and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=-1"], r"train.eval_every=-1 must be >= 0"),
    (["train.eval_batches=0"], r"train.eval_batches=0 must be > 0"),
    (["train.eval_every=5", "data.dir=/x"], r"train.eval_every=5 with data.dir='/x': set "
                                            r"train.eval_dir"),
    (["train.eval_dir=/x"], r"train.eval_dir='/x' is set but data.dir is null"),
])
def test_bad_eval_settings_name_the_key(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_a_missing_eval_dir_is_named(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"train.eval_dir='.*nowhere' is not a prepared"):
        heldout_batches(tiny(f"data.dir={tmp_path}", f"train.eval_dir={tmp_path / 'nowhere'}"))


def test_own_data_without_a_held_out_set_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"train.eval_every=5: this command trains on its "
                                          r"own data"):
        train(tiny("train.eval_every=5"), tmp_path, data=lambda: iter(()))
