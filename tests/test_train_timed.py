"""`train.checkpoint_minutes`: checkpoints by the clock besides `train.checkpoint_every`.
A run that saved by time and was then stopped resumes to the losses of an uninterrupted
run (the step, not the time, decides the data); with two processes, process 0's clock
decides for both, so they save at the same steps."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.trainer import Hook, train
from conftest import ROOT

RUN = ["train.steps=8", "optimizer.warmup_steps=2", "train.checkpoint_every=1000",
       "train.keep_checkpoints=10", "model.n_layers=1", "data.seq_len=32"]
MINUTES = "train.checkpoint_minutes=1e-6"  # 60 microseconds: every step is later than that


class Killed(RuntimeError):
    pass


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def kill(step, state):
    raise Killed(f"killed after step {step}")


@pytest.mark.slow
def test_timed_checkpoint_resumes_to_the_uninterrupted_losses(tiny, tmp_path):
    reference = [m["loss"] for m in train(tiny(*RUN), tmp_path / "ref").history]
    assert saved_steps(tmp_path / "ref") == [8]  # checkpoint_every=1000: only the last

    work = tmp_path / "killed"
    with pytest.raises(Killed):  # stops after step 5's hooks ran, before its checkpoint
        train(tiny(*RUN, MINUTES), work, hooks=(Hook(kill, at=frozenset({5})),))
    # process 0 decides after step s whether step s+1 saves: never step 1; a save resets
    # the clock, so the steps right after one may not save (the save is asynchronous)
    timed = saved_steps(work)
    assert timed[0] == 2 and set(timed) <= {2, 3, 4}, timed

    resumed = train(tiny(*RUN, MINUTES), work).history
    assert resumed[0]["step"] == timed[-1] + 1
    assert [m["loss"] for m in resumed] == reference[timed[-1]:]
    assert [m["loss"] for m in read_metrics(work)] == reference


@pytest.mark.multiprocess
def test_two_processes_save_at_the_same_steps(tmp_path):
    """2 processes x 4 devices: every timed checkpoint holds both processes' data state
    (a save only one process made would hang the other, or lack its file)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PORT")}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, DEVICES="8", WORKDIR=str(tmp_path),
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".pytest_cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    proc = subprocess.Popen(["launch/local.sh", "2", "configs/tiny.yaml", *RUN, MINUTES],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a save one process skipped hangs the other
        for _ in range(2):  # local.sh forwards the first as SIGTERM, the second as SIGKILL
            proc.send_signal(signal.SIGINT)
            time.sleep(1)
        out, _ = proc.communicate()
        raise AssertionError(f"the processes hung:\n{out}") from None
    assert proc.returncode == 0, out
    steps = saved_steps(tmp_path)
    assert len(steps) >= 2 and steps[-1] == 8, steps  # timed ones before the last
    for s in steps:
        for p in (0, 1):
            assert (tmp_path / "checkpoints" / str(s) / "data"
                    / f"process_{p}-of-2.json").exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 9))
