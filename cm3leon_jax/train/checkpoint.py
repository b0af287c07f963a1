"""Checkpoints: train state, data iterator state and resolved config, saved together.

orbax's CheckpointManager writes each step asynchronously and marks it complete only when
every item is on disk, so a run killed mid-save resumes from the previous complete step.
The data iterator goes through grain's orbax handler (one JSON per process), next to an
index-based data position (global batches consumed) that lets a run resume with a different
number of processes, and a checksum of every array of the state (bit sums computed on the
devices, so any mesh gives the same numbers). A checkpoint that fails to restore (a
truncated file) or whose restored arrays differ from their checksums (flipped bytes) is
reported, renamed `<step>.corrupt`, and the one before it is used. When checkpoints exist
and none restores, the run stops with the reasons instead of silently starting over
(`train.allow_restart` starts over on purpose).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cm3leon_jax.config import Config, ConfigError

# Sections that must match between a checkpoint and the config resuming it: they decide the
# shapes (and meaning) of the saved arrays.
MUST_MATCH = ("vocab", "model")


def manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))


def reader(directory: str | Path) -> ocp.CheckpointManager:
    """A manager for reading a run's steps (export, scoring); it creates nothing."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ConfigError(f"{directory} does not exist: expected a run's checkpoint directory")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


class NoCheckpointRestores(ConfigError):
    """Checkpoints exist but none restores; the run does not start over by itself."""


def _bit_sum(x: jax.Array) -> jax.Array:
    """The array's bits as unsigned words summed mod 2^32: any flipped byte changes it, and
    integer addition gives the same number under every sharding."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jnp.sum(jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32),
                   dtype=jnp.uint32)


@jax.jit
def _bit_sums(state) -> dict:
    return jax.tree.map(_bit_sum, state)


def checksums(state) -> dict[str, int]:
    """Per array of the state (by tree path), its bit sum."""
    sums = jax.device_get(_bit_sums(state))
    return {jax.tree_util.keystr(path): int(v)
            for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, cfg: Config) -> None:
    import grain  # optional: loading weights needs no grain (absent on the GPU machine)

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        position=ocp.args.JsonSave({"global_batches": step,
                                    "process_count": jax.process_count(),
                                    "checksums": checksums(state)}),
        config=ocp.args.JsonSave(cfg.to_dict())), force=True)


def verify(state, position: dict, where: str) -> None:
    """Refuse a restored state whose arrays differ from the checksums saved with it
    (checkpoints written before checksums existed are not checked)."""
    saved = position.get("checksums")
    if saved is None:
        return
    got = checksums(state)
    bad = sorted(k for k in saved if got.get(k) != saved[k])
    if bad or set(got) != set(saved):
        raise ValueError(f"{where}: {len(bad)} arrays differ from the checksums written at "
                         f"save ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter, cfg: Config):
    """The state at `step` laid out as `abstract_state` says (any mesh), and the data
    iterator moved to where it was (also under another process count); refuses a
    checkpoint of a different model."""
    import grain  # optional: loading weights needs no grain (absent on the GPU machine)

    meta = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                      position=ocp.args.JsonRestore()))
    saved, position = meta["config"], meta["position"]
    _check_model(mngr, step, saved, cfg)
    saved_workers = saved.get("data", {}).get("workers", 0)
    if cfg.data.dir is not None and saved_workers != cfg.data.workers:
        # grain's iterator state holds one position per worker: it fits only that count
        raise ConfigError(
            f"checkpoint {mngr.directory}/{step} was written with data.workers="
            f"{saved_workers} but the config says {cfg.data.workers}; resume with the same "
            "worker count")
    saved_packing = saved.get("data", {}).get("packing", "pack")
    if cfg.data.dir is not None and saved_packing != cfg.data.packing:
        # each packer keeps its own iterator state: another one cannot continue it
        raise ConfigError(
            f"checkpoint {mngr.directory}/{step} was written with data.packing="
            f"{saved_packing} but the config says {cfg.data.packing}; resume with "
            f"data.packing={saved_packing}")
    where = f"checkpoint {mngr.directory}/{step}"
    if position["process_count"] == jax.process_count():
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        verify(restored["state"], position, where)  # before the iterator is moved
        mngr.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        return restored["state"]
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    verify(restored["state"], position, where)
    seek(data_iter, Path(mngr.directory) / str(step), position)
    return restored["state"]


def _check_model(mngr: ocp.CheckpointManager, step: int, saved: dict, cfg: Config) -> None:
    current = cfg.to_dict()
    for section in MUST_MATCH:
        for key, value in current[section].items():
            if saved.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"checkpoint {mngr.directory}/{step} was written with {section}.{key}="
                    f"{saved.get(section, {}).get(key)!r} but the config says {value!r}")


def seek(data_iter, step_dir: Path, position: dict) -> None:
    """Elastic resume: move a fresh iterator to global batch `position['global_batches']`.

    Works for pipelines whose iterator state is just `{"next_index": n}` with n = global
    batches consumed on every process (a MapDataset indexed by global batch, as the
    synthetic source); anything else needs the process count it was saved with.
    """
    n, count = position["global_batches"], position["process_count"]
    fresh = data_iter.get_state()
    saved_file = step_dir / "data" / f"process_0-of-{count}.json"
    saved = json.loads(saved_file.read_text()) if saved_file.exists() else None
    if set(fresh) != {"next_index"} or saved != {"next_index": n}:
        raise ConfigError(
            f"checkpoint {step_dir} was written by {count} processes and its data iterator "
            f"state ({saved_file.name}: {saved}) is not an index-based position; resume it "
            f"with {count} processes (now {jax.process_count()})")
    data_iter.set_state({"next_index": n})


def _everyone(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter, cfg: Config):
    """(step, state, failures) of the newest checkpoint every process restores, or
    (0, None, failures) to start from scratch.

    Incomplete saves (orbax's temporary directories) are never listed; a complete one that
    fails to read or to match its checksums is reported, renamed `<step>.corrupt` and
    skipped. When checkpoints were there (or set aside earlier) and none restores, raises
    NoCheckpointRestores unless `train.allow_restart`; then `failures` lists them and the
    caller must start from a fresh data iterator (a failed restore may have moved it).
    """
    failures = []
    for step in sorted(mngr.all_steps(), reverse=True):
        error = None
        try:
            state = restore(mngr, step, abstract_state, data_iter, cfg)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
            error = e
        if _everyone(error is None):
            return step, state, failures
        path = Path(mngr.directory) / str(step)
        failures.append(f"{step}: {type(error).__name__}: {str(error)[:200]}" if error
                        else f"{step}: failed on another process")
        if jax.process_index() == 0:
            aside, n = path.with_name(f"{step}.corrupt"), 0
            while aside.exists():
                n += 1
                aside = path.with_name(f"{step}.corrupt{n}")
            why = f"{type(error).__name__}: {str(error)[:300]}" if error else "on another process"
            print(f"checkpoint {path} cannot be restored ({why}); moved to {aside.name}, "
                  "trying the previous one", file=sys.stderr, flush=True)
            path.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"corrupt checkpoint {step}")
        mngr.reload()
    aside = sorted(p.name for p in Path(mngr.directory).glob("*.corrupt*"))
    if (failures or aside) and not cfg.train.allow_restart:
        raise NoCheckpointRestores(
            f"no checkpoint in {mngr.directory} restores ("
            + "; ".join(failures or [f"set aside before: {', '.join(aside)}"])
            + "); not starting over by itself: set train.allow_restart=true to train from "
            "step 0 (the old metrics are kept)")
    return 0, None, failures or aside


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The resolved config saved with `step` (a plain dict, not yet validated)."""
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    """`step`, or the latest complete one; refuses a step the directory does not have."""
    steps = mngr.all_steps()
    if not steps:
        raise ConfigError(f"{mngr.directory} has no complete checkpoint")
    if step is None:
        return max(steps)
    if step not in steps:
        raise ConfigError(f"{mngr.directory} has no checkpoint for step {step} "
                          f"(it has {sorted(steps)})")
    return step


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: dict) -> dict:
    """Only the parameters of `step`, laid out as `abstract_params` says (any mesh); the
    optimizer state and the data iterator are not read."""
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract_params})
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {"params": abstract_params}, restore_args=restore_args, partial_restore=True)))
    return restored["state"]["params"]
