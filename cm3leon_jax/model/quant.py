"""int8 weight-only quantisation for generation (`generate.weights: int8`).

Contract:
- `quantize(params)` replaces each matmul kernel and the (tied) embedding of a Transformer
  params dict by a `QArray`: int8 values and one float32 scale per output channel,
  symmetric (scale = max |w| / 127 over the channel, q = round(w / scale), so
  |w - q * scale| <= scale / 2 up to the float32 rounding of w / scale). Every other leaf
  (positions, QK-norm scales) stays as it is: they are a fraction of a percent of the bytes.
- A QArray reads like the array it replaces: the model reads every parameter as
  `self.w[...]`, and `QArray[...]` is the dequantized float32 array. So `nnx.merge(graphdef,
  qparams)` builds a model that runs unchanged, the device memory (and the jitted decode's
  arguments) hold int8, and each layer's kernels are dequantized inside the layer scan, where
  they are used — never a float copy of the whole model.
- Output channel = an axis the matmul does not contract: the scale keeps every axis but the
  contracted ones (kept with size 1, so it broadcasts), the `layers` axis included. The
  embedding's rows are its channels both as a lookup table and as the tied unembedding.
- `qparam_axes(param_axes)` gives the logical axes of the quantized tree (the scale's size-1
  axes unsharded), for `parallel.mesh.shardings`.

Why not AQT (`aqtp`): its flax API is linen modules (AqtEinsum / AqtDotGeneral with a
freezer writing linen variable collections) that would replace the model's einsums; our
model is NNX with plain einsums, and weight-only int8 needs only this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cm3leon_jax.parallel import mesh as mesh_lib

QMAX = 127  # symmetric: -127..127, so the range is the same on both sides

# params path -> the axes its matmul contracts (the scale is 1 along these); a path not here
# stays float. tests/test_quant.py pins the float ones, so a new parameter needs a decision.
CONTRACTED = {
    ("embed",): (1,),  # [vocab, d]: lookup rows; tied logits contract d
    ("head",): (0,),  # [d, vocab] (untied)
    ("blocks", "attn", "qkv"): (1,),  # [layers, d, 3, heads, head_dim]
    ("blocks", "attn", "out"): (1, 2),  # [layers, heads, head_dim, d]
    ("blocks", "ffn", "w_in"): (1,),  # [layers, d, d_ff]
    ("blocks", "ffn", "w_out"): (1,),  # [layers, d_ff, d]
}


@struct.dataclass
class QArray:
    """int8 values and their per-channel float32 scale; `[key]` dequantizes."""
    values: jax.Array  # int8, the float array's shape
    scale: jax.Array  # float32, that shape with the contracted axes of size 1

    def dequantize(self) -> jax.Array:
        return self.values.astype(self.scale.dtype) * self.scale

    def __getitem__(self, key) -> jax.Array:
        return self.dequantize()[key]


def quantize_array(w: jax.Array, axes: tuple[int, ...]) -> QArray:
    """Symmetric int8 with one scale per slice over `axes`; an all-zero channel (the
    zero-initialised projections) gets scale 0 and values 0, dequantizing exactly."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / QMAX
    q = jnp.round(w / jnp.where(scale > 0, scale, 1.0))
    return QArray(jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), scale)


def _path(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def quantize(params: dict) -> dict:
    """The params dict with its matmul kernels and embeddings as QArrays (jit it, with
    `qparam_axes` shardings as out_shardings, to quantize on the devices)."""
    def one(path, w):
        axes = CONTRACTED.get(_path(path))
        return w if axes is None else quantize_array(w, axes)

    return jax.tree.map_with_path(one, params)


def dequantize(qparams: dict) -> dict:
    """float32 params back from a quantized tree (what the model computes with)."""
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QArray) else x, qparams,
                        is_leaf=lambda x: isinstance(x, QArray))


def qparam_axes(param_axes: dict) -> dict:
    """The logical axes of `quantize`'s tree from the params' (`ModelDef.param_axes`)."""
    def one(path, names):
        axes = CONTRACTED.get(_path(path))
        if axes is None:
            return names
        return QArray(names, tuple(None if i in axes else n for i, n in enumerate(names)))

    return jax.tree.map_with_path(one, param_axes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def abstract_quantize(abstract_params: dict, shardings: dict) -> dict:
    """ShapeDtypeStructs of `quantize`'s tree with the given shardings (a tree like
    `qparam_axes`'s), for compiling ahead of time without materialising anything."""
    shapes = jax.eval_shape(quantize, abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def quantize_placed(params: dict, param_axes: dict, mesh=None) -> dict:
    """`quantize` on the devices the params are on; with a mesh, in the quantized tree's
    shardings (the values split like the float kernels were)."""
    out = None if mesh is None else mesh_lib.shardings(qparam_axes(param_axes), mesh)
    return jax.jit(quantize, out_shardings=out)(params)
