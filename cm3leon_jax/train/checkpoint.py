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

    _check_config(mngr, step, cfg)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]


def _check_config(mngr: ocp.CheckpointManager, step: int, cfg: Config) -> None:
    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    current = cfg.to_dict()
    for section in MUST_MATCH:
        for key, value in current[section].items():
            if saved.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"checkpoint {mngr.directory}/{step} was written with {section}.{key}="
                    f"{saved.get(section, {}).get(key)!r} but the config says {value!r}")


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state, cfg: Config):
    """The train state alone (no data iterator: for generation and export), laid out as
    `abstract_state` says; refuses a checkpoint of a different model."""
    _check_config(mngr, step, cfg)
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
