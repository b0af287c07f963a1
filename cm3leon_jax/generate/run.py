"""A trained run for generation: its config.yaml and the parameters of its latest complete
checkpoint, laid out on the run's mesh (every device holds only its own shards)."""

from __future__ import annotations

from pathlib import Path

import jax

from cm3leon_jax.config import Config, ConfigError, load_config
from cm3leon_jax.generate.tasks import Model
from cm3leon_jax.parallel.mesh import make_mesh
from cm3leon_jax.train import checkpoint
from cm3leon_jax.train.state import abstract_state, state_layout


def load_run(workdir: str | Path, overrides: list[str] = ()) -> tuple[Config, Model, int]:
    """(config, model, checkpoint step) of the run in `workdir`; `overrides` may change
    the `generate` and `mesh` sections (the model must match the checkpoint)."""
    workdir = Path(workdir)
    path = workdir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{workdir}: not a run directory (no config.yaml); "
                          "train one with `cm3leon train --workdir`")
    cfg = load_config(path, list(overrides), num_devices=jax.device_count())
    mngr = checkpoint.manager(workdir / "checkpoints", cfg.train.keep_checkpoints)
    step = mngr.latest_step()
    if step is None:
        raise ConfigError(f"{workdir}/checkpoints: no complete checkpoint to generate from")
    mesh = make_mesh(cfg.mesh)
    tx, mdef, shardings = state_layout(cfg, mesh)
    with jax.set_mesh(mesh):
        abstract = abstract_state(cfg, tx, shardings)
        state = checkpoint.restore_state(mngr, step, abstract, cfg)
    mngr.close()
    model = Model(mdef.graphdef, state.params, cfg.vocab.build(), cfg.model.max_seq_len, mesh)
    return cfg, model, step
