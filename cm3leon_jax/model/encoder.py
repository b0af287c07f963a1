"""The built-in retrieval dual encoder: an image tower over pixels, a text tower over tokens.

Both towers end in one `embed_dim` space, L2-normalised, and are trained contrastively
(InfoNCE, `retrieval/train_encoder.py`) on prepared image–caption pairs, so a document can
be scored against another by either side (CM3Leon uses frozen CLIP here; none ships
offline, stack.md §A2). Parameters carry the project's logical axis names, so the same
rule table shards them as it shards the decoder.

Image tower: four stride-2 3x3 convolutions (ReLU), mean pool, linear. Text tower: token
and position embeddings, `text_layers` bidirectional pre-LN attention blocks with a
padding mask, masked mean pool, linear. Text token 0 is padding; the caller shifts ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.model.transformer import layer_norm

MAX_TEXT = 128  # text tower positions; longer texts are truncated
CHANNELS = (32, 64, 96)  # the first convolutions; the last has `width` channels
HEAD_DIM = 32


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    text_size: int  # text token ids 1..text_size (0 is padding)
    embed_dim: int = 128
    width: int = 128
    text_layers: int = 2

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_DIM)


def _param(rngs, shape, axes, std=None, zeros=False):
    if zeros:
        value = jnp.zeros(shape, jnp.float32)
    else:
        fan_in = 1
        for s in shape[:-1]:
            fan_in *= s
        std = std if std is not None else fan_in ** -0.5
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes)


class TextBlock(nnx.Module):
    def __init__(self, spec: EncoderSpec, rngs: nnx.Rngs):
        d, h = spec.width, spec.heads
        self.qkv = _param(rngs, (d, 3, h, d // h), ("embed", "qkv", "heads", "head_dim"),
                          std=d ** -0.5)
        self.out = _param(rngs, (h, d // h, d), ("heads", "head_dim", "embed"), std=d ** -0.5)
        self.w_in = _param(rngs, (d, 4 * d), ("embed", "mlp"))
        self.w_out = _param(rngs, (4 * d, d), ("mlp", "embed"), zeros=True)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = jnp.einsum("btd,dshk->sbthk", layer_norm(x), self.qkv[...])
        o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        x = x + jnp.einsum("bthk,hkd->btd", o, self.out[...])
        return x + jax.nn.relu(layer_norm(x) @ self.w_in[...]) @ self.w_out[...]


class DualEncoder(nnx.Module):
    def __init__(self, spec: EncoderSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d = spec.width
        chans = (3, *CHANNELS, d)
        self.convs = nnx.List([_param(rngs, (3, 3, cin, cout), (None, None, None, None))
                               for cin, cout in zip(chans[:-1], chans[1:])])
        self.image_proj = _param(rngs, (d, spec.embed_dim), ("embed", None))
        self.tok = _param(rngs, (spec.text_size + 1, d), ("vocab", "embed"), std=0.02)
        self.pos = _param(rngs, (MAX_TEXT, d), ("pos", "embed"), std=0.02)
        self.blocks = nnx.List([TextBlock(spec, rngs) for _ in range(spec.text_layers)])
        self.text_proj = _param(rngs, (d, spec.embed_dim), ("embed", None))

    def embed_images(self, pixels: jax.Array) -> jax.Array:
        """uint8 [B, H, W, 3] -> unit vectors [B, embed_dim]."""
        x = pixels.astype(jnp.float32) / 127.5 - 1.0
        for w in self.convs:
            x = jax.lax.conv_general_dilated(x, w[...], (2, 2), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x)
        return _unit(x.mean(axis=(1, 2)) @ self.image_proj[...])

    def embed_texts(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, T] (0 = padding, T <= MAX_TEXT) -> unit vectors [B, embed_dim]."""
        mask = tokens > 0
        x = jnp.take(self.tok[...], tokens, axis=0) + self.pos[...][:tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = layer_norm(x)
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return _unit(pooled @ self.text_proj[...])


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def new_encoder(spec: EncoderSpec, seed: int) -> DualEncoder:
    with nnx.use_eager_sharding(False):
        return DualEncoder(spec, rngs=nnx.Rngs(seed))
