"""The native export: our parameters as flat named tensors in `model.safetensors`, plus a
`config.json` that rebuilds the model (and, through `train.init_from`, a training state).

Tensor names are the parameter paths joined by dots (`embed`, `pos`, `blocks.attn.qkv`,
`blocks.ffn.w_in`, ...), with the layer-stacked layout of the model unchanged (leading
`layers` axis), so a round trip is a byte copy: import gives back bit-identical arrays.
Reading uses safetensors slices, so every device loads only its own shard from disk.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from cm3leon_jax.config import Config, ConfigError, from_dict, validate
from cm3leon_jax.export import tensor_file
from cm3leon_jax.train.state import ModelDef

FORMAT = "cm3leon_jax"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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


def tensors(params: dict, mesh: Mesh, piece_bytes: int = tensor_file.PIECE_BYTES):
    return [tensor_file.Tensor(name, tuple(a.shape), np.dtype(a.dtype),
                               tensor_file.row_pieces(a, mesh, piece_bytes))
            for name, a in flatten(params).items()]


def config_json(cfg: Config, mdef: ModelDef, step: int, source: str) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "weights": WEIGHTS,
        "step": step, "source": source,
        "config": cfg.to_dict(),
        "vocab": cfg.vocab.build().to_json(),
        "tensors": {name: list(axes) for name, axes in flatten(mdef.param_axes).items()},
    }


def read_config(export_dir: str | Path) -> tuple[Config, dict]:
    """The run config of an export directory (validated) and its whole config.json."""
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{export_dir} is not an export directory: {path} does not exist")
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
    try:
        cfg = from_dict(meta["config"])
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg, meta


def read_params(export_dir: str | Path, mdef: ModelDef, shardings: dict) -> dict:
    """The exported parameters as global arrays laid out by `shardings`; each device's
    shard is read straight from the file. Names, shapes and dtypes must match `mdef`."""
    from safetensors import safe_open

    path = Path(export_dir) / WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    want = flatten(mdef.abstract_params)
    where = flatten(shardings)
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        have = set(f.keys())
        if have != set(want):
            raise ConfigError(f"{path}: tensors {sorted(have ^ set(want))} are in only one of "
                              "the file and the model its config.json describes")
        for name, abstract in want.items():
            piece = f.get_slice(name)
            shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
            if shape != tuple(abstract.shape) or dtype != tensor_file.DTYPES[abstract.dtype]:
                raise ConfigError(f"{path}: tensor {name} is {dtype}{list(shape)}, the model "
                                  f"needs {tensor_file.DTYPES[abstract.dtype]}"
                                  f"{list(abstract.shape)}")
            out[name] = jax.make_array_from_callback(shape, where[name],
                                                     lambda idx, p=piece: p[idx])
    return unflatten(out)


# Model keys that decide what the exported tensors mean; the rest (dtype, remat, z_loss,
# ...) may change when fine-tuning from an export.
SAME_MODEL = ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len", "activation",
              "tie_embeddings", "qk_norm", "swin_norm")


def check_init_from(cfg: Config) -> None:
    """Refuse `train.init_from` unless it is an export of this model and vocabulary."""
    where = f"train.init_from={cfg.train.init_from}"
    try:
        saved, _ = read_config(cfg.train.init_from)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    pairs = [(f"vocab.{k}", getattr(saved.vocab, k), v)
             for k, v in dataclasses.asdict(cfg.vocab).items()]
    pairs += [(f"model.{k}", getattr(saved.model, k), getattr(cfg.model, k)) for k in SAME_MODEL]
    for key, theirs, ours in pairs:
        if theirs != ours:
            raise ConfigError(f"{where}: the export has {key}={theirs!r} but the config "
                              f"says {ours!r}")

