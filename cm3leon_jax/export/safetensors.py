"""The native export: our parameters as flat named tensors in `model.safetensors`, plus a
`config.json` that rebuilds the model (and, through `train.init_from`, a training state).

Tensor names are the parameter paths joined by dots (`embed`, `pos`, `blocks.attn.qkv`,
`blocks.ffn.w_in`, ...), with the layer-stacked layout of the model unchanged (leading
`layers` axis), so a round trip is a byte copy: loading (train/weights.py, which owns the
format) gives back bit-identical arrays.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from cm3leon_jax.config import Config
from cm3leon_jax.export import tensor_file
from cm3leon_jax.train.state import ModelDef
from cm3leon_jax.train.weights import FORMAT, VERSION, flatten


def tensors(params: dict, mesh: Mesh, piece_bytes: int = tensor_file.PIECE_BYTES):
    return [tensor_file.Tensor(name, tuple(a.shape), np.dtype(a.dtype),
                               tensor_file.row_pieces(a, mesh, piece_bytes))
            for name, a in flatten(params).items()]


def config_json(cfg: Config, mdef: ModelDef, step: int, source: str, weights: str) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "weights": weights,
        "step": step, "source": source,
        "config": cfg.to_dict(),
        "vocab": cfg.vocab.build().to_json(),
        "tensors": {name: list(axes) for name, axes in flatten(mdef.param_axes).items()},
    }
