"""Training on cloud storage (issue 19), against a GCS API on 127.0.0.1 (conftest's
`bucket`): a `gs://` work directory gets the config, checkpoints, metrics and TensorBoard
events; a run killed with SIGKILL resumes from the bucket bit-exactly; the run lock is an
object there (refused while held, taken over when stale)."""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import jax
import pytest

from cm3leon_jax import storage
from cm3leon_jax.train import lock as lock_lib
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.trainer import train
from test_fault_tolerance import expected_ids, finish, ids_by_step, small, start

STEPS = 20


def state_leaves(run, step: int) -> list[np.ndarray]:
    tree = ocp.StandardCheckpointer().restore(storage.path(run) / "checkpoints" / str(step)
                                              / "state")
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_train_writes_everything_to_the_bucket_and_matches_a_local_run(tiny, bucket, tmp_path):
    local = train(small(tiny, "train.steps=10"), tmp_path).history
    run = f"{bucket}/run"
    remote = train(small(tiny, "train.steps=10"), run).history
    assert [m["loss"] for m in remote] == [m["loss"] for m in local]
    root = storage.path(run)
    assert sorted(p.name for p in root.iterdir()) == [
        "checkpoints", "config.yaml", "metrics.jsonl", "tensorboard"]
    timing = ("tokens_per_s", "real_tokens_per_s", "mfu")
    assert ([{k: v for k, v in m.items() if k not in timing} for m in read_metrics(run)]
            == [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(tmp_path)])
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 11))
    assert (root / "config.yaml").read_text() == (tmp_path / "config.yaml").read_text()
    events = list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().length > 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["10", "5"]
    for a, b in zip(state_leaves(run, 10), state_leaves(tmp_path, 10)):
        np.testing.assert_array_equal(a, b)
    # nothing of the run is left outside the bucket (no local folder named "gs:")
    assert not os.path.exists("gs:")
    # the finished run is at its last step: a relaunch does nothing
    assert train(small(tiny, "train.steps=10"), run).history == []


@pytest.mark.multiprocess
def test_sigkill_resumes_bitwise_from_the_bucket(tiny, bucket, tmp_path):
    ref = train(small(tiny, "train.checkpoint_every=1", "train.keep_checkpoints=2"),
                tmp_path).history
    run = f"{bucket}/killed"
    ckpts = storage.path(run) / "checkpoints"
    kill_after = int(np.random.default_rng(int(time.time())).integers(3, 12))
    proc = start(1, run, "train.checkpoint_every=1", "train.keep_checkpoints=2")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, finish(proc)
        saved = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] \
            if ckpts.exists() else []
        if saved and max(saved) >= kill_after:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    hist = train(small(tiny, "train.checkpoint_every=1", "train.keep_checkpoints=2"),
                 run).history
    assert 1 < hist[0]["step"] <= STEPS, kill_after
    assert ids_by_step(run) == expected_ids(range(1, STEPS + 1)), kill_after
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in ref]
    for a, b in zip(state_leaves(run, STEPS), state_leaves(tmp_path, STEPS)):
        np.testing.assert_array_equal(a, b, err_msg=f"killed after step {kill_after}")


def _holder(**fields) -> str:
    return json.dumps({"host": "elsewhere", "boot": "other", "pid": 1, "started": "then",
                       "heartbeat": time.time(), **fields})


def test_run_lock_is_an_object_in_the_bucket(bucket, monkeypatch):
    path = storage.path(f"{bucket}/run/.lock")
    first = lock_lib.RunLock(path).acquire()
    held = json.loads(path.read_text())
    assert held["pid"] == os.getpid() and "heartbeat" in held
    with pytest.raises(lock_lib.RunLocked, match=f"pid {os.getpid()}"):
        lock_lib.RunLock(path).acquire()
    first.release()
    assert not path.exists()

    # a holder on another machine that stopped beating: refused until its heartbeat is
    # STALE_S old, then taken over
    path.write_text(_holder(heartbeat=time.time() - 60))
    with pytest.raises(lock_lib.RunLocked, match="host elsewhere"):
        lock_lib.RunLock(path).acquire()
    monkeypatch.setattr(lock_lib, "STALE_S", 30.0)
    taken = lock_lib.RunLock(path).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    taken.release()

    # a holder of this machine whose process is gone (kill -9): taken over at once; a live
    # one is not, nor a dead pid of another machine with the same host name
    gone = subprocess.Popen(["true"])
    gone.wait()
    here = {"host": socket.gethostname(), "boot": lock_lib._boot_id()}
    for fields, free in (({**here, "pid": gone.pid}, True), ({**here, "pid": os.getppid()}, False),
                         ({**here, "boot": "another", "pid": gone.pid}, False)):
        path.write_text(_holder(**fields))
        if free:
            lock_lib.RunLock(path).acquire().release()
        else:
            with pytest.raises(lock_lib.RunLocked, match=f"pid {fields['pid']}"):
                lock_lib.RunLock(path).acquire()


def test_a_lock_taken_over_is_lost_by_its_old_holder(bucket, monkeypatch):
    """Every write of the holder is conditioned on its own last generation: when another job
    took the lock over (the holder looked stale), the holder's next heartbeat fails, it
    marks the lock lost, and its release leaves the new holder's lock alone."""
    monkeypatch.setattr(lock_lib, "HEARTBEAT_S", 0.2)
    path = storage.path(f"{bucket}/run/.lock")
    old = lock_lib.RunLock(path).acquire()
    path.write_text(_holder(pid=4242))  # another job's takeover (a new generation)
    deadline = time.monotonic() + 20
    while not old.lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert old.lost
    old.release()
    assert json.loads(path.read_text())["pid"] == 4242  # not deleted by the old holder
