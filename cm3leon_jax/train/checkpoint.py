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

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.parallel import distributed

# Sections that must match between a checkpoint and the config resuming it: they decide the
# shapes (and meaning) of the saved arrays.
MUST_MATCH = ("vocab", "model")


def manager(directory: storage.PathLike, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        storage.path(storage.absolute(directory)),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))


def reader(directory: storage.PathLike) -> ocp.CheckpointManager:
    """A manager for reading a run's steps (export, scoring); it creates nothing."""
    directory = storage.path(storage.absolute(directory))
    if not directory.is_dir():
        raise ConfigError(f"{directory} does not exist: expected a run's checkpoint directory")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


class NoCheckpointRestores(ConfigError):
    """Checkpoints exist but none restores; the run does not start over by itself."""


def _bit_sum(x: jax.Array) -> jax.Array:
    """The array's bits as unsigned words, each times an odd weight from its index, summed
    mod 2^32: any flipped byte or misplaced block changes it, and integer addition gives
    the same number under every sharding and process count."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _bit_sums(state) -> list:
    return [_bit_sum(x) for x in jax.tree.leaves(state)]


def checksums(state) -> list[int]:
    """Per array of the state, in tree order, its weighted bit sum."""
    return [int(v) for v in jax.device_get(_bit_sums(state))]


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
    (checkpoints written before checksums existed are not checked). A collective: every
    process calls it."""
    saved = position.get("checksums")
    if saved is None:
        return
    got = checksums(state)
    if len(got) != len(saved):
        raise ValueError(f"{where}: {len(saved)} checksums for {len(got)} arrays")
    bad = [i for i, (a, b) in enumerate(zip(got, saved)) if a != b]
    if bad:
        names = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state)[0]]
        raise ValueError(f"{where}: {len(bad)} arrays differ from the checksums written at "
                         f"save ({', '.join(names[i] for i in bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''})")


class _Corrupt(Exception):
    """A checkpoint that cannot be used: it is set aside and the previous one tried."""


def _check_saved(mngr: ocp.CheckpointManager, step: int, cfg: Config) -> dict:
    """The saved position after checking the saved config against this one (ConfigError
    for a checkpoint of another model, worker count or packing)."""
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
    return position


def _agreed(fn):
    """Run `fn()` on every process; (result, None) when it worked everywhere, else
    (None, the local error or a note). Out-of-memory is not a property of the checkpoint
    and is raised, not set aside."""
    result, error = None, None
    try:
        result = fn()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
        if "RESOURCE_EXHAUSTED" in str(e):
            raise
        error = f"{type(e).__name__}: {str(e)[:300]}"
    if distributed.everyone(error is None):
        return result, None
    return None, error or "failed on another process"


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter, cfg: Config):
    """The state at `step` laid out as `abstract_state` says (any mesh), checked against
    its checksums, and the data iterator moved to where it was (also under another process
    count); refuses a checkpoint of a different model. Each phase is agreed by every
    process before the next, so a failure on one never leaves the others in a collective;
    raises _Corrupt (with the reason) when the checkpoint is unusable."""
    import grain  # optional: loading weights needs no grain (absent on the GPU machine)

    where = f"checkpoint {mngr.directory}/{step}"
    position = _check_saved(mngr, step, cfg)
    restored, error = _agreed(lambda: mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"])
    if error is None:
        _, error = _agreed(lambda: verify(restored, position, where))
    if error is None and position["process_count"] == jax.process_count():
        _, error = _agreed(lambda: mngr.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iter))))
    elif error is None:
        _, error = _agreed(lambda: seek(data_iter, storage.path(mngr.directory) / str(step),
                                        position))
    if error is not None:
        raise _Corrupt(error)
    return restored


def _check_model(mngr: ocp.CheckpointManager, step: int, saved: dict, cfg: Config) -> None:
    current = cfg.to_dict()
    for section in MUST_MATCH:
        for key, value in current[section].items():
            if saved.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"checkpoint {mngr.directory}/{step} was written with {section}.{key}="
                    f"{saved.get(section, {}).get(key)!r} but the config says {value!r}")


def seek(data_iter, step_dir: storage.Path, position: dict) -> None:
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
        try:
            return step, restore(mngr, step, abstract_state, data_iter, cfg), failures
        except _Corrupt as e:
            why = str(e)
        path = storage.path(mngr.directory) / str(step)
        failures.append(f"{step}: {why[:200]}")
        if jax.process_index() == 0:
            aside, n = path.with_name(f"{step}.corrupt"), 0
            while aside.exists():
                n += 1
                aside = path.with_name(f"{step}.corrupt{n}")
            print(f"checkpoint {path} cannot be restored ({why}); moved to {aside.name}, "
                  "trying the previous one", file=sys.stderr, flush=True)
            storage.move_aside(path, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"corrupt checkpoint {step}")
        mngr.reload()
    aside = sorted(p.name for p in storage.path(mngr.directory).glob("*.corrupt*"))
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
