"""Checkpoints: train state, data iterator state and resolved config, saved together.

orbax's CheckpointManager writes each step asynchronously and marks it complete only when
every item is on disk, so a run killed mid-save resumes from the previous complete step.
The data iterator goes through grain's orbax handler (one JSON per process).
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

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


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, cfg: Config) -> None:
    import grain

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(cfg.to_dict())), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter, cfg: Config):
    """The state at `step` laid out as `abstract_state` says (any mesh), and the data
    iterator moved to where it was; refuses a checkpoint of a different model."""
    import grain

    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    current = cfg.to_dict()
    for section in MUST_MATCH:
        for key, value in current[section].items():
            if saved.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"checkpoint {mngr.directory}/{step} was written with {section}.{key}="
                    f"{saved.get(section, {}).get(key)!r} but the config says {value!r}")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]


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
