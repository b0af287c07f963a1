"""The one way to load trained weights: a run directory (the parameters of a checkpoint) or
an export directory (`cm3leon export --format safetensors`), for generation, the demo,
evaluation, scoring, export and `train.init_from`.

Only the parameters are read, laid out over a mesh of the current devices (which need not
be the mesh that trained them): a run's optimizer state and data iterator stay on disk, so
a checkpoint whose optimizer state is damaged still generates. Every device reads only its
own shard. Everything that can be refused is refused from the saved config before any
array is read. Both may be local or on cloud storage (`gs://`, storage.py): orbax reads
checkpoints there itself; an export's `model.safetensors` on cloud storage is copied to
this machine first (safetensors reads local files only).

The export format lives here too (read here, written by export/safetensors.py): our
parameters as flat named tensors in `model.safetensors`, names the parameter paths joined
by dots (`embed`, `blocks.attn.qkv`, ...) with the layer-stacked layout unchanged, plus a
`config.json` that rebuilds the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open

from cm3leon_jax import layout, storage
from cm3leon_jax.config import Config, ConfigError, MeshConfig, from_dict, validate
from cm3leon_jax.config.loader import apply_overrides
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train import checkpoint
from cm3leon_jax.storage import Path, PathLike
from cm3leon_jax.train.state import ModelDef, model_def

FORMAT = "cm3leon_jax"  # config.json "format" of our exports
VERSION = 1
DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
          np.dtype(np.int64): "I64", np.dtype(jnp.bfloat16): "BF16"}  # safetensors names
# Model keys that decide what the tensors mean; the rest (dtype, remat, z_loss, ...) may
# change when generating from or fine-tuning weights.
SAME_MODEL = ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len", "activation",
              "tie_embeddings", "qk_norm", "swin_norm", "positions", "rope_theta")


@dataclasses.dataclass(frozen=True)
class Weights:
    cfg: Config
    mdef: ModelDef
    params: dict  # global arrays laid out by mdef.param_shardings(mesh)
    mesh: Mesh
    step: int
    origin: str  # the checkpoint step directory or the export directory


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b.c": leaf} in a stable (sorted) order."""
    out = {}
    for key in sorted(tree):
        name = f"{prefix}{key}"
        if isinstance(tree[key], dict):
            out.update(flatten(tree[key], name + "."))
        else:
            out[name] = tree[key]
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


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


# --- configs -------------------------------------------------------------------------------

def _export_config(export: Path) -> tuple[dict, int, str]:
    path = layout.ExportDir(export).config
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format is {meta.get('format')!r}, not {FORMAT!r} "
                          "(only `cm3leon export --format safetensors` directories load back; "
                          "hf-opt directories are for transformers)")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{path}: version {meta.get('version')!r}, this code reads {VERSION}")
    return meta["config"], int(meta.get("step", 0)), str(export)


def _saved(path: Path, step: int | None, mngr=None) -> tuple[dict, int, str]:
    """(raw config, step, origin) of a run directory's checkpoint (read through `mngr`) or
    of an export."""
    if mngr is not None:
        step = checkpoint.resolve_step(mngr, step)
        return checkpoint.saved_config(mngr, step), step, f"{mngr.directory}/{step}"
    if layout.ExportDir(path).config.is_file():
        if step is not None:
            raise ConfigError(f"{path} is an export (one step); --step applies to run "
                              "directories only")
        return _export_config(path)
    raise ConfigError(f"{path} is neither a run directory (no checkpoints/) nor an export "
                      f"directory (no {layout.ExportDir(path).config.name})")


def _resolve(raw: dict, overrides: list[str], origin: str) -> Config:
    """The saved config (an error in it names where it was saved), then `overrides` on it
    (an error in one names only its key)."""
    try:
        saved = from_dict(raw, saved=True)
        validate(saved)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    if not overrides:
        return saved
    cfg = from_dict(apply_overrides(raw, list(overrides)), saved=True)
    validate(cfg)
    return cfg


def _reader(path: Path):
    """A reader of the run's checkpoints, or a no-op context for an export."""
    if layout.is_run(path):
        return checkpoint.reader(layout.RunDir(path).checkpoints)
    return contextlib.nullcontext()


def saved_config(path: PathLike, step: int | None = None,
                 overrides: list[str] = ()) -> tuple[Config, int, str]:
    """(config, step, origin) of a run directory's checkpoint (`step`, or the latest) or of
    an export directory, with `overrides` applied and validated."""
    path = storage.path(path)
    with _reader(path) as mngr:
        raw, step, origin = _saved(path, step, mngr)
    return _resolve(raw, overrides, origin), step, origin


def check_same_model(saved: Config, cfg: Config, where: str, kind: str = "weights") -> None:
    """Refuse weights (of a `kind`: run or export) whose vocabulary or tensor-shaping model
    keys differ from `cfg`'s."""
    pairs = [(f"vocab.{k}", getattr(saved.vocab, k), v)
             for k, v in dataclasses.asdict(cfg.vocab).items()]
    pairs += [(f"model.{k}", getattr(saved.model, k), getattr(cfg.model, k)) for k in SAME_MODEL]
    for key, theirs, ours in pairs:
        if theirs != ours:
            raise ConfigError(f"{where}: the {kind} has {key}={theirs!r} but the config says "
                              f"{ours!r}")


NO_TOKENIZERS = ("no tokenizers: set sft.tokenizers (or data.dir) to a prepared data "
                 "directory or an export's tokenizers/")


def tokenizer_dir(cfg: Config, path: PathLike | None = None) -> tuple[Path, str] | None:
    """Where the tokenizers of a model are, and what says so (None: nowhere, as for the
    synthetic source): `sft.tokenizers`; for weights at an export `path`, its own
    tokenizers/; the init's (`train.init_from`, the same way); else `data.dir`."""
    if cfg.sft.tokenizers:
        return storage.path(cfg.sft.tokenizers), "sft.tokenizers"
    if path is not None and not layout.is_run(path):
        own = layout.ExportDir(path).tokenizers.root
        if own.is_dir():
            return own, f"the tokenizers of {path}"
    init = cfg.train.init_from
    if init:
        found = tokenizer_dir(saved_config(init)[0], init)
        if found is not None:
            return found[0], f"train.init_from={init}"
    if cfg.data.dir:
        return storage.path(cfg.data.dir), "data.dir"
    return None


# --- parameters ----------------------------------------------------------------------------

def load(path: PathLike, step: int | None = None, *, overrides: list[str] = (),
         mesh: Mesh | None = None, dtype: str | None = None) -> Weights:
    """The weights of a run directory (checkpoint `step`, or the latest) or an export.

    `overrides` may change any section but the model's tensors (the SAME_MODEL keys and
    the vocabulary); `dtype` sets model.dtype (the compute dtype).
    """
    path = storage.path(path)
    kind = "run" if layout.is_run(path) else "export"
    with _reader(path) as mngr:
        raw, step, origin = _saved(path, step, mngr)
        extra = [*overrides, *([f"model.dtype={dtype}"] if dtype else [])]
        cfg = _resolve(raw, extra, origin)
        check_same_model(_resolve(raw, [], origin), cfg, f"{origin} with {' '.join(extra)}",
                         kind)
        mdef = model_def(cfg)
        mesh = mesh or inference_mesh(cfg)
        shardings = mdef.param_shardings(mesh)
        if mngr is not None:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                mdef.abstract_params, shardings)
            params = checkpoint.restore_params(mngr, step, abstract)
        else:
            params = _read_export(layout.ExportDir(path).weights, mdef, shardings)
    bad = non_finite(params)
    if bad:
        raise ConfigError(f"{origin}: parameters {', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''} hold non-finite values; the "
                          "weights are corrupt (use another checkpoint step)")
    return Weights(cfg, mdef, params, mesh, step, origin)


@jax.jit
def _all_finite(params: dict) -> dict:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params)


def non_finite(params: dict) -> list[str]:
    """The names of the parameters with a NaN or an infinity (on the devices: one bool
    each comes back)."""
    ok = jax.device_get(_all_finite(params))
    return [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(ok)[0]
            if not v]


@contextlib.contextmanager
def _open_safetensors(path: Path, local):
    """safe_open, with a damaged file (truncated, not safetensors) named as bad input."""
    try:
        f = safe_open(str(local), framework="numpy")
    except SafetensorError as e:
        raise ConfigError(f"{path} is not a readable safetensors file ({e}); export it "
                          "again") from None
    with f:
        yield f


def _read_export(path: Path, mdef: ModelDef, shardings: dict) -> dict:
    """The exported parameters as global arrays laid out by `shardings`; each device's
    shard is read straight from the file (a local copy of a remote one). Names, shapes and
    dtypes must match `mdef`."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    want = flatten(mdef.abstract_params)
    where = flatten(shardings)
    out = {}
    with storage.local_copy(path) as local, _open_safetensors(path, local) as f:
        have = set(f.keys())
        if have != set(want):
            raise ConfigError(f"{path}: tensors {sorted(have ^ set(want))} are in only one of "
                              "the file and the model its config.json describes")
        for name, abstract in want.items():
            piece = f.get_slice(name)
            shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
            need = DTYPES[np.dtype(abstract.dtype)]
            if shape != tuple(abstract.shape) or dtype != need:
                raise ConfigError(f"{path}: tensor {name} is {dtype}{list(shape)}, the model "
                                  f"needs {need}{list(abstract.shape)}")
            out[name] = jax.make_array_from_callback(shape, where[name],
                                                     lambda idx, p=piece: p[idx])
    return unflatten(out)


def check_init(cfg: Config) -> None:
    """Refuse `train.init_from` unless it exists and holds this model and vocabulary
    (cheap: configs only, before anything compiles)."""
    path, where = storage.path(cfg.train.init_from), f"train.init_from={cfg.train.init_from}"
    if not path.exists():
        raise ConfigError(f"{where}: does not exist (expected a run directory with "
                          "checkpoints/ or a safetensors export)")
    try:
        saved, _, _ = saved_config(path)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_same_model(saved, cfg, where, "run" if layout.is_run(path) else "export")
