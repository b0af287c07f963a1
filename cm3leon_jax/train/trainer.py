"""The training loop that pretraining (`cm3leon train`), fine-tuning (`cm3leon sft`) and the
scaling sweep share: build the mesh and the sharded state, resume from the run directory's
checkpoint (or start from `train.init_from`), run the jitted step on the batches it is
given, and call hooks after chosen steps.

Each step's metrics are read one step late, after the next step is dispatched, so the host
never stalls the devices; a step with a hook due is read at once (its hooks see a known
update). Built in: the metrics log (`metrics.jsonl`, TensorBoard, the progress bar or
lines), the checkpoint hook (every `train.checkpoint_every` steps, `train.checkpoint_minutes`
after the last save, the last step, and on SIGTERM, never over the last good checkpoint
while steps are being skipped), the `train.profile_steps` trace, and the stop on a run of
non-finite steps, and the held-out losses every `train.eval_every` steps and at the last
(train/heldout.py, on the live parameters with the sharded forward pass, merged into that
step's metrics line as `eval_loss`, `eval_text_loss`, `eval_image_loss`; not at a SIGTERM
stop, whose checkpoint comes first). Callers add hooks (the sweep's
evaluations at its FLOP grid). Only process 0 writes metrics, config and reports.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError, save_config, validate
from cm3leon_jax.data.pipeline import train_batches
from cm3leon_jax.layout import RunDir
from cm3leon_jax.parallel import distributed
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train import checkpoint, heldout, weights
from cm3leon_jax.train.lock import STALE_S, RunLock, RunLocked
from cm3leon_jax.train.metrics import (MetricsWriter, Progress, device_peak_tflops,
                                       host_metrics, mfu)
from cm3leon_jax.train.profiler import StepProfile
from cm3leon_jax.train.state import (TrainState, abstract_state, create_state, state_from_params,
                                     state_layout)
from cm3leon_jax.train.step import jit_train_step


class BadStepsError(RuntimeError):
    """Too many updates in a row were skipped as non-finite; the job stopped."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    history: list[dict]  # this call's per-step metrics
    preempted_at: int | None = None  # the step SIGTERM stopped the run at (checkpointed)


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(step, state)` after every `every`-th step (0: none), after the steps in `at`,
    and, with `at_end`, after the run's last step (or the step a preemption stops at).

    `state` is live only during the call: the next step donates its buffers.
    """
    fn: Callable[[int, TrainState], None]
    every: int = 0
    at: frozenset = frozenset()
    at_end: bool = False

    def due(self, step: int, last: bool) -> bool:
        return ((self.every and step % self.every == 0) or step in self.at
                or (self.at_end and last))


def _id_gatherer(mesh):
    """This process's example ids -> the step's global ids, replicated for process 0's log
    (an on-device all-gather, so the host does not wait)."""
    replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))

    def gather(ids):
        ids = np.asarray(ids)
        if ids.size and ids.max() >= 2**31:
            raise ValueError(f"example id {ids.max()} does not fit int32 (fault.log_example_ids)")
        return replicate(jax.make_array_from_process_local_data(
            mesh_lib.batch_sharding(mesh, 1), ids.astype(np.int32)))

    return gather


class TimedSaves:
    """`train.checkpoint_minutes`: whether a step saves because that long has passed since
    the last save. Process 0's clock decides, and every process must save at the same step:
    after each step process 0's verdict goes into a replicated device array (a small
    collective queued behind the step), which every process reads at the next step, when it
    reads the previous step's metrics anyway; so the processes agree, one step late, and
    the host never waits on the devices for it. The step, not the time, decides the data,
    so where a timed checkpoint falls does not change a resumed run."""

    def __init__(self, minutes: float, mesh, rows: int):
        self.interval = 60 * minutes
        self.last = time.monotonic()
        self.rows = rows  # this process's batch rows: process 0 holds global row 0
        self.sharding = mesh_lib.batch_sharding(mesh, 1)
        self.first_row = jax.jit(lambda x: x[0], out_shardings=NamedSharding(mesh, P()))
        self.verdict = None  # process 0's verdict for the next step, on the devices

    def saved(self) -> None:
        self.last = time.monotonic()

    def decide(self) -> None:
        """After a step's hooks, on every process: whether the next step saves."""
        due = jax.process_index() == 0 and time.monotonic() - self.last >= self.interval
        self.verdict = self.first_row(jax.make_array_from_process_local_data(
            self.sharding, np.full(self.rows, due, np.int32)))

    def due(self) -> bool:
        """Whether this step saves (the same answer on every process)."""
        return self.verdict is not None and bool(jax.device_get(self.verdict))


def _keep_metrics(run: RunDir) -> storage.Path | None:
    """Move the metrics and TensorBoard events of an abandoned run aside (a restart must
    not overwrite history)."""
    if not run.metrics.exists():
        return None
    n = 1
    while run.metrics_before_restart(n).exists():
        n += 1
    if run.tensorboard.exists():
        storage.move_aside(run.tensorboard,
                           run.tensorboard.with_name(f"tensorboard.before-restart-{n}"))
    storage.move_aside(run.metrics, run.metrics_before_restart(n))
    return run.metrics_before_restart(n)


def train(cfg: Config, workdir: storage.PathLike, data: Callable[[], Iterator[dict]] | None = None,
          hooks: tuple[Hook, ...] = (), checkpoint_at: frozenset = frozenset(),
          heldout_batches: list[dict] | None = None) -> TrainResult:
    """Train to `cfg.train.steps` updates in total; returns this call's per-step metrics.

    `data()` makes this process's batch iterator (a grain iterator, whose state is
    checkpointed), called after the cheap checks; by default the pretraining data
    (`data.dir`, else the synthetic source). `hooks` run in order, before the checkpoint
    of the same step; `checkpoint_at` adds checkpoints (the sweep keeps its evaluated
    steps). Every process of a multi-process job calls this with the same config. SIGTERM
    makes it finish the current step, save a checkpoint and return (`preempted_at` says
    where); more than `fault.max_bad_steps` skipped (non-finite) updates in a row raise
    BadStepsError with the last good checkpoint kept. `heldout_batches` is this process's
    share of the held-out set `train.eval_every` evaluates; by default the pretraining
    held-out set (`train.eval_dir`, else synthetic rows training never reaches).
    """
    run = RunDir(workdir)
    validate(cfg, jax.device_count())
    distributed.check_same_config(cfg)
    lead = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(cfg.mesh)
    distributed.check_batch_layout(cfg, mesh)
    distributed.log(f"{distributed.topology()}; mesh {dict(mesh.shape)}; "
                    f"config {cfg.digest()}")
    run.root.mkdir(parents=True, exist_ok=True)
    lock, locked = None, None
    if lead:
        try:
            lock = RunLock(run.lock).acquire()
        except RunLocked as e:
            locked = e
    if not distributed.everyone(locked is None):  # every process stops, none waits
        raise locked or RunLocked(f"{run.root} is being trained by another job")
    try:
        tx, mdef, shardings = state_layout(cfg, mesh)
        mngr = checkpoint.manager(run.checkpoints, cfg.train.keep_checkpoints)
        if cfg.train.init_from and not mngr.latest_step():
            weights.check_init(cfg)  # before any compile or data
        if cfg.train.eval_every and heldout_batches is None:
            if data is not None:
                raise ConfigError(f"train.eval_every={cfg.train.eval_every}: this command trains "
                                  "on its own data and has no held-out set for it; set "
                                  "train.eval_every=0")
            heldout_batches = heldout.heldout_batches(cfg, jax.process_index(),
                                                      jax.process_count())
        if data is None:
            data = lambda: train_batches(cfg, jax.process_index(), jax.process_count())
        batches = data()
        if lead:
            save_config(cfg, run.config)

        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        flops = cfg.model.flops_per_token(cfg.vocab.build().size, cfg.data.seq_len)
        peak = cfg.train.peak_tflops or device_peak_tflops()
        history: list[dict] = []
        preempt = distributed.Preemption()

        with jax.set_mesh(mesh):
            start, state, failed = checkpoint.restore_latest(
                mngr, abstract_state(cfg, tx, shardings), batches, cfg)
            if state is None and failed:  # train.allow_restart: a truly fresh start
                if cfg.train.init_from:
                    weights.check_init(cfg)
                if lead:
                    kept = _keep_metrics(run)
                    print(f"train.allow_restart: no checkpoint restores ({len(failed)} failed); "
                          f"starting over from step 0" + (f", old metrics kept as {kept.name}"
                                                          if kept else ""), flush=True)
                batches = data()
            if state is None and cfg.train.init_from:
                params = weights.load(cfg.train.init_from, mesh=mesh).params
                state = state_from_params(params, tx, shardings)
            elif state is None:
                state = create_state(cfg, tx, shardings)
            step_fn = jit_train_step(cfg, mdef, tx, shardings, mesh)
            gather_ids = _id_gatherer(mesh) if cfg.fault.log_example_ids else None
            evaluator = heldout.Evaluator(cfg, heldout_batches) if cfg.train.eval_every else None
            writer = MetricsWriter(run, start, enabled=lead, trackers=cfg.train.trackers,
                                   config=cfg.to_dict(), wandb_project=cfg.train.wandb_project)
            progress = Progress(cfg.train.progress, cfg.train.steps, start, enabled=lead)
            profile = StepProfile(cfg.train.profile_steps, run.profile, enabled=lead)
            timed = (TimedSaves(cfg.train.checkpoint_minutes, mesh,
                                cfg.train.batch_size // jax.process_count())
                     if cfg.train.checkpoint_minutes else None)
            t_start = last = time.perf_counter()
            pending = None  # metrics of the previous step: read after the next is dispatched
            bad_run, skipped, last_saved, stopped_at = 0, 0, start, None

            def log(step, device_metrics, ids, evaluate=False):
                """Read a step's metrics (waiting for it), then with `evaluate` measure the
                held-out losses of the state after it, and write the line."""
                nonlocal last, bad_run, skipped
                record = host_metrics(step, device_metrics)  # waits for that step to finish
                now = time.perf_counter()
                record["tokens_per_s"] = tokens_per_step / (now - last)  # row slots, padding too
                record["real_tokens_per_s"] = record["real_tokens"] / (now - last)
                record["mfu"] = mfu(flops, record["tokens_per_s"], peak, jax.device_count())
                last = now
                bad_run = bad_run + 1 if record["skipped"] else 0
                skipped += bool(record["skipped"])
                record["skipped_steps"] = skipped
                if ids is not None:
                    record["example_ids"] = np.asarray(jax.device_get(ids)).tolist()
                if evaluate:  # after the step's timing, so throughput excludes the evaluation
                    losses = evaluator(state.params)
                    record.update({f"eval_{k}": losses[k] for k in ("loss", "text_loss",
                                                                     "image_loss")})
                    last = time.perf_counter()
                history.append(record)
                logged = (step % cfg.train.log_every == 0 or step == cfg.train.steps
                          or bool(record["skipped"]) or evaluate)
                if logged:
                    writer.write(record)
                progress.update(record, logged)
                if bad_run > cfg.fault.max_bad_steps:
                    raise BadStepsError(
                        f"steps {step - bad_run + 1}..{step}: {bad_run} updates in a row skipped "
                        f"(non-finite loss or gradient norm), more than fault.max_bad_steps="
                        f"{cfg.fault.max_bad_steps}; stopped. The last good checkpoint is step "
                        f"{last_saved} in {run.checkpoints}")

            def save(step, state):
                nonlocal last_saved
                if not distributed.everyone(lock is None or not lock.lost):
                    raise RunLocked(f"{run.lock}: this job lost the run lock (another job took "
                                    f"it over, or the bucket was unreachable for "
                                    f"{STALE_S / 2:.0f}s); stopped before checkpoint "
                                    f"{step}, the last one is {last_saved}")
                if bad_run == 0:  # never overwrite the last good checkpoint mid-run
                    checkpoint.save(mngr, step, state, batches, cfg)
                    last_saved = step
                    writer.flush()
                    if timed is not None:
                        timed.saved()

            save_hook = Hook(save, every=cfg.train.checkpoint_every, at=checkpoint_at,
                             at_end=True)
            hooks = (*hooks, save_hook)
            preempt.install()
            try:
                for step in range(start + 1, cfg.train.steps + 1):
                    local = next(batches)
                    ids = local.pop("example_id", None)
                    batch = mesh_lib.global_batch(local, mesh)
                    profile.before(step)
                    state, metrics = step_fn(state, batch)
                    profile.after(step, metrics)
                    ids = gather_ids(ids) if gather_ids and ids is not None else None
                    if pending is not None:
                        log(*pending)
                    pending = (step, metrics, ids)
                    stop = preempt.reached(step)
                    timed_due = timed is not None and timed.due()
                    due = [h for h in hooks if h.due(step, stop or step == cfg.train.steps)
                           or (h is save_hook and timed_due)]
                    # not on SIGTERM: the checkpoint must be written within the grace period
                    evaluate = evaluator is not None and not stop and (
                        step % cfg.train.eval_every == 0 or step == cfg.train.steps)
                    if due or evaluate:
                        log(*pending, evaluate)  # hooks know whether this update was applied
                        pending = None
                    for hook in due:
                        hook.fn(step, state)
                    if stop:
                        stopped_at = step
                        break
                    if timed is not None and step < cfg.train.steps:
                        timed.decide()
                if pending is not None:
                    log(*pending)
            finally:
                preempt.uninstall()
                profile.close()
                mngr.wait_until_finished()
                progress.close()
                writer.close()

        if lead and stopped_at is not None:
            print(f"preempted ({preempt.name}) at step {stopped_at}: checkpoint "
                  f"{run.checkpoints / str(last_saved)} saved; relaunch to resume")
        elif lead and history:
            elapsed = time.perf_counter() - t_start
            losses = [f"{m['loss']:.4f}" for m in history if m["loss"] is not None] or ["n/a"]
            print(f"trained steps {start + 1}..{cfg.train.steps} in {elapsed:.1f}s: "
                  f"loss {losses[0]} -> {losses[-1]}, {skipped} skipped, "
                  f"checkpoint {run.checkpoints / str(last_saved)}")
        elif lead:
            print(f"{run.root} is already at step {start} of train.steps={cfg.train.steps}")
        return TrainResult(history, stopped_at)
    finally:
        if lock is not None:
            lock.release()
