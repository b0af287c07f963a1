"""`cm3leon train`: build the mesh and the sharded state, resume if the work directory has a
checkpoint, run the jitted step, log metrics, save checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import jax
from tqdm import tqdm

from cm3leon_jax.config import Config, save_config
from cm3leon_jax.export import safetensors as init_from
from cm3leon_jax.model.size import flops_per_token
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train import checkpoint
from cm3leon_jax.train.metrics import MetricsWriter, device_peak_tflops, host_metrics, mfu
from cm3leon_jax.train.optimizer import make_optimizer
from cm3leon_jax.train.state import (abstract_state, create_state, model_def,
                                     state_from_params, state_shardings)
from cm3leon_jax.train.step import jit_train_step


def make_batches(cfg: Config):
    """This process's batches: the prepared-data pipeline, or the synthetic source."""
    if cfg.data.dir is not None:
        raise NotImplementedError(
            f"data.dir={cfg.data.dir!r}: the prepared-data pipeline is not built yet; "
            "leave data.dir unset to train on the built-in synthetic source")
    from cm3leon_jax.data.synthetic import synthetic_batches

    return synthetic_batches(cfg.vocab.build(), cfg.data.seq_len, cfg.train.batch_size,
                             cfg.data.seed, jax.process_index(), jax.process_count())


def train(cfg: Config, workdir: str | Path) -> list[dict]:
    """Train to `cfg.train.steps` updates in total; returns this run's per-step metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    mdef = model_def(cfg)
    shardings = state_shardings(cfg, mdef, tx, mesh)
    batches = make_batches(cfg)
    mngr = checkpoint.manager(workdir / "checkpoints", cfg.train.keep_checkpoints)
    if cfg.train.init_from and not mngr.latest_step():
        init_from.check_init_from(cfg)  # before any compile
    if lead:
        save_config(cfg, workdir / "config.yaml")

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.vocab.build().size, cfg.data.seq_len)
    peak = cfg.train.peak_tflops or device_peak_tflops()
    history: list[dict] = []

    with jax.set_mesh(mesh):
        start = mngr.latest_step() or 0
        if start:
            state = checkpoint.restore(mngr, start, abstract_state(cfg, tx, shardings),
                                       batches, cfg)
        elif cfg.train.init_from:
            params = init_from.read_params(cfg.train.init_from, mdef, shardings.params)
            state = state_from_params(params, tx, shardings)
        else:
            state = create_state(cfg, tx, shardings)
        step_fn = jit_train_step(cfg, mdef, tx, shardings, mesh)
        writer = MetricsWriter(workdir, start, enabled=lead)
        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", disable=not lead,
                   dynamic_ncols=True)
        t_start = last = time.perf_counter()
        pending = None  # metrics of the previous step: read after the next is dispatched

        def log(step, device_metrics):
            nonlocal last
            record = host_metrics(step, device_metrics)  # waits for that step to finish
            now = time.perf_counter()
            record["tokens_per_s"] = tokens_per_step / (now - last)
            record["mfu"] = mfu(flops, record["tokens_per_s"], peak, jax.device_count())
            last = now
            history.append(record)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                writer.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")

        for step in range(start + 1, cfg.train.steps + 1):
            batch = mesh_lib.global_batch(next(batches), mesh)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                log(*pending)
            pending = (step, metrics)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                checkpoint.save(mngr, step, state, batches, cfg)
        if pending is not None:
            log(*pending)
        mngr.wait_until_finished()
        bar.close()
        writer.close()

    if lead and history:
        elapsed = time.perf_counter() - t_start
        print(f"trained steps {start + 1}..{cfg.train.steps} in {elapsed:.1f}s: "
              f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}, "
              f"checkpoint {workdir / 'checkpoints' / str(cfg.train.steps)}")
    elif lead:
        print(f"{workdir} is already at step {start} of train.steps={cfg.train.steps}")
    return history
