"""`train.init_from`: the weights a fresh run starts from, a safetensors export or a run
directory (its latest checkpoint's parameters only: the optimizer state and data iterator
are not read, so a fine-tune starts at step 0 with a new optimizer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.export import safetensors as st


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def check_init(cfg: Config) -> None:
    """Refuse `train.init_from` unless it exists and holds this model and vocabulary
    (cheap: configs only, before anything compiles)."""
    path = cfg.train.init_from
    if not is_run_dir(path):
        if not Path(path).exists():
            raise ConfigError(f"train.init_from={path}: does not exist (expected a run "
                              "directory with checkpoints/ or a safetensors export)")
        return st.check_init_from(cfg)
    from cm3leon_jax.export.source import run_config

    where = f"train.init_from={path}"
    try:
        saved, _ = run_config(path)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    pairs = [(f"vocab.{k}", getattr(saved.vocab, k), v)
             for k, v in dataclasses.asdict(cfg.vocab).items()]
    pairs += [(f"model.{k}", getattr(saved.model, k), getattr(cfg.model, k))
              for k in st.SAME_MODEL]
    for key, theirs, ours in pairs:
        if theirs != ours:
            raise ConfigError(f"{where}: the run has {key}={theirs!r} but the config says "
                              f"{ours!r}")


def read_init(cfg: Config, mdef, shardings: dict) -> dict:
    """The init parameters as global arrays laid out by `shardings`."""
    path = cfg.train.init_from
    if not is_run_dir(path):
        return st.read_params(path, mdef, shardings)
    import jax

    from cm3leon_jax.train import checkpoint

    mngr = checkpoint.reader(Path(path) / "checkpoints")
    step = checkpoint.resolve_step(mngr, None)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            mdef.abstract_params, shardings)
    return checkpoint.restore_params(mngr, step, abstract)
