"""optimizer.schedule: linear (the default, unchanged), cosine and wsd, each against its
formula written out by hand at chosen steps; optimizer.decay_fraction's checks."""

import dataclasses
import math

import optax
import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.train.optimizer import lr_schedule

PEAK, W, L, END = 2.0, 10, 110, 0.1  # peak lr, warm-up, schedule length, final ratio
STEPS = [0, 1, 5, 9, 10, 11, 30, 60, 87, 88, 89, 100, 109, 110, 111, 500]


def schedule_of(tiny, *overrides):
    cfg = tiny(f"optimizer.lr={PEAK}", f"optimizer.warmup_steps={W}",
               f"optimizer.final_lr_ratio={END}", f"train.steps={L}", *overrides)
    return lr_schedule(cfg.optimizer, cfg.train.steps)


def warmup(t):
    return PEAK * t / W


def linear(t):
    if t < W:
        return warmup(t)
    return PEAK + (END * PEAK - PEAK) * min(t - W, L - W) / (L - W)


def cosine(t):
    if t < W:
        return warmup(t)
    return END * PEAK + (PEAK - END * PEAK) * 0.5 * (1 + math.cos(math.pi * min(t - W, L - W)
                                                                 / (L - W)))


def wsd(fraction):
    decay = round(fraction * L)
    start = L - decay

    def lr(t):
        if t < W:
            return warmup(t)
        if t < start:
            return PEAK
        return PEAK + (END * PEAK - PEAK) * min(t - start, decay) / decay
    return lr


@pytest.mark.parametrize("name,overrides,formula", [
    ("linear", [], linear),
    ("cosine", ["optimizer.schedule=cosine"], cosine),
    ("wsd 0.2", ["optimizer.schedule=wsd", "optimizer.decay_fraction=0.2"], wsd(0.2)),
    ("wsd 0.9", ["optimizer.schedule=wsd", "optimizer.decay_fraction=0.9"], wsd(0.9)),
])
def test_schedule_values(tiny, name, overrides, formula):
    s = schedule_of(tiny, *overrides)
    for t in STEPS:
        assert float(s(t)) == pytest.approx(formula(t), rel=1e-6, abs=1e-7), (name, t)


def test_wsd_phases(tiny):
    """decay_fraction=0.2 of 110 steps: flat at the peak through step 88, then down."""
    s = schedule_of(tiny, "optimizer.schedule=wsd", "optimizer.decay_fraction=0.2")
    assert [float(s(t)) for t in (10, 50, 88)] == [PEAK] * 3
    assert float(s(89)) < PEAK and float(s(110)) == pytest.approx(END * PEAK)


def test_wsd_decaying_all_the_way_is_linear(tiny):
    """decay_fraction=1 leaves no room for a warm-up; without one it is the linear schedule."""
    plain = schedule_of(tiny, "optimizer.warmup_steps=0")
    s = schedule_of(tiny, "optimizer.warmup_steps=0", "optimizer.schedule=wsd",
                    "optimizer.decay_fraction=1")
    assert [float(s(t)) for t in STEPS] == [float(plain(t)) for t in STEPS]


def test_linear_is_the_default_and_unchanged(tiny):
    """The schedule every run had before optimizer.schedule existed, bit for bit."""
    cfg = tiny(f"optimizer.lr={PEAK}", f"optimizer.warmup_steps={W}", f"train.steps={L}")
    assert cfg.optimizer.schedule == "linear" and cfg.optimizer.decay_fraction is None
    o = cfg.optimizer
    before = optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, o.warmup_steps),
         optax.linear_schedule(o.lr, o.lr * o.final_lr_ratio, max(L - o.warmup_steps, 1))],
        [o.warmup_steps])
    s = lr_schedule(o, L)
    assert [float(s(t)) for t in STEPS] == [float(before(t)) for t in STEPS]


def test_cosine_and_wsd_end_where_linear_does(tiny):
    for extra in (["optimizer.schedule=cosine"],
                  ["optimizer.schedule=wsd", "optimizer.decay_fraction=0.3"]):
        s = schedule_of(tiny, *extra, "optimizer.decay_steps=60")
        assert float(s(60)) == pytest.approx(END * PEAK) == float(s(200))


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.decay_fraction=0.2"],
     r"optimizer.decay_fraction=0.2 is for optimizer.schedule=wsd only \(it is linear\)"),
    (["optimizer.schedule=cosine", "optimizer.decay_fraction=0.2"],
     r"decay_fraction=0.2 is for optimizer.schedule=wsd only \(it is cosine\)"),
    (["optimizer.schedule=wsd"], r"optimizer.schedule=wsd needs optimizer.decay_fraction"),
    (["optimizer.schedule=wsd", "optimizer.decay_fraction=0"],
     r"optimizer.decay_fraction=0.0 must be in \(0, 1\]"),
    (["optimizer.schedule=wsd", "optimizer.decay_fraction=1.5"],
     r"optimizer.decay_fraction=1.5 must be in \(0, 1\]"),
    (["optimizer.schedule=exp"], r"optimizer.schedule='exp' is not one of"),
    (["optimizer.schedule=wsd", "optimizer.decay_fraction=0.95", "optimizer.decay_steps=100"],
     r"optimizer.warmup_steps=10 runs into the wsd decay, the last 95 of 100 steps"),
    (["optimizer.schedule=wsd", "optimizer.decay_fraction=0.001", "optimizer.decay_steps=100"],
     r"optimizer.decay_fraction=0.001 of the schedule length 100 .* is no decay step"),
])
def test_schedule_keys_are_checked_at_load(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_wsd_against_train_steps_is_refused_at_load_and_by_the_schedule(tiny):
    """With decay_steps null the length is train.steps (another section): `validate` checks
    it at load, and the schedule itself refuses it too."""
    with pytest.raises(ConfigError, match=r"runs into the wsd decay, the last 95 of 100 steps"):
        tiny("train.steps=100", "optimizer.schedule=wsd", "optimizer.decay_fraction=0.95")
    cfg = tiny("train.steps=100", "optimizer.schedule=wsd", "optimizer.decay_fraction=0.5")
    o = dataclasses.replace(cfg.optimizer, decay_fraction=0.95)
    with pytest.raises(ConfigError, match=r"runs into the wsd decay, the last 95 of 100 steps"):
        lr_schedule(o, cfg.train.steps)
