"""Where trained weights come from: a run directory's checkpoint or a safetensors export.

Both give the same thing: the run's config and its parameters as global arrays sharded
over a mesh of the current devices (which need not be the mesh that trained them). Only
the parameters are read; the optimizer state and the data iterator stay on disk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from jax.sharding import Mesh

from cm3leon_jax.config import Config, ConfigError, MeshConfig, from_dict, validate
from cm3leon_jax.export import safetensors as st
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train import checkpoint
from cm3leon_jax.train.state import ModelDef, model_def


@dataclasses.dataclass(frozen=True)
class Weights:
    cfg: Config
    mdef: ModelDef
    params: dict  # global arrays laid out by mdef.param_shardings(mesh)
    mesh: Mesh
    step: int
    origin: str  # the checkpoint step directory or the export directory


def inference_mesh(cfg: Config, devices=None) -> Mesh:
    """The run's mesh if it fits these devices, else the parameters split (FSDP) over as
    many of them as divide model.d_model."""
    devices = list(jax.devices() if devices is None else devices)
    m, vocab_size = cfg.model, cfg.vocab.build().size
    try:
        _, fsdp, tensor = cfg.mesh.shape(len(devices))
        fits = (m.d_model % fsdp == 0 and
                all(x % tensor == 0 for x in (m.n_heads, m.d_ff, vocab_size)))
    except ConfigError:
        fits = False
    if fits:
        return mesh_lib.make_mesh(cfg.mesh, devices)
    n = max(k for k in range(1, len(devices) + 1) if m.d_model % k == 0)
    return mesh_lib.make_mesh(MeshConfig(data=1, fsdp=n, tensor=1), devices[:n])


def _with_dtype(cfg: Config, dtype: str | None) -> Config:
    if dtype is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


def run_config(workdir: str | Path, step: int | None = None) -> tuple[Config, int]:
    """The config saved with a run's checkpoint (`step`, or the latest), validated."""
    mngr = checkpoint.reader(Path(workdir) / "checkpoints")
    step = checkpoint.resolve_step(mngr, step)
    try:
        cfg = from_dict(checkpoint.saved_config(mngr, step))
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{mngr.directory}/{step}: {e}") from None
    return cfg, step


def from_run(workdir: str | Path, step: int | None = None, mesh: Mesh | None = None,
             dtype: str | None = None) -> Weights:
    cfg, step = run_config(workdir, step)
    cfg = _with_dtype(cfg, dtype)
    mdef = model_def(cfg)
    mesh = mesh or inference_mesh(cfg)
    shardings = mdef.param_shardings(mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            mdef.abstract_params, shardings)
    mngr = checkpoint.reader(Path(workdir) / "checkpoints")
    params = checkpoint.restore_params(mngr, step, abstract)
    return Weights(cfg, mdef, params, mesh, step, f"{mngr.directory}/{step}")


def from_export(export_dir: str | Path, mesh: Mesh | None = None,
                dtype: str | None = None) -> Weights:
    cfg, meta = st.read_config(export_dir)
    cfg = _with_dtype(cfg, dtype)
    mdef = model_def(cfg)
    mesh = mesh or inference_mesh(cfg)
    params = st.read_params(export_dir, mdef, mdef.param_shardings(mesh))
    return Weights(cfg, mdef, params, mesh, int(meta.get("step", 0)), str(export_dir))


def load(path: str | Path, step: int | None = None, mesh: Mesh | None = None,
         dtype: str | None = None) -> Weights:
    """A run directory (has `checkpoints/`) or an export directory (has `config.json`)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return from_run(path, step, mesh, dtype)
    if (path / st.CONFIG).is_file():
        if step is not None:
            raise ConfigError(f"{path} is an export (one step); --step applies to run "
                              "directories only")
        return from_export(path, mesh, dtype)
    raise ConfigError(f"{path} is neither a run directory (no checkpoints/) nor an export "
                      f"directory (no {st.CONFIG})")
