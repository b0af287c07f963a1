"""The CM3Leon decoder (CM3Leon §2.3; gaps filled from metaseq's OPT recipe).

Pre-LN, no biases, no dropout, parameter-free LayerNorm, learned absolute positions,
truncated-normal init (std 0.006 at +-3 std), attention-output and second FFN projections
initialised to zero, ReLU FFN of width d_ff, tied input/output embeddings. Chameleon's
stability options: QK-norm, z-loss (in the loss), swin norm order. `model.positions=rope`
replaces the position table by rotary queries and keys (Chameleon's, LLaMA's): attention
scores then depend on offsets only (the demo's choice: a better small model; docs/decisions.md).

Layers are stacked on a leading `layers` axis and run with a scan, so compile time does
not grow with depth; the remat policy decides what the backward pass recomputes.
Parameters are float32; matmuls run in `model.dtype`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cm3leon_jax.config import ModelConfig
from cm3leon_jax.model import attention
from cm3leon_jax.parallel.mesh import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ACT = ("act_batch", "act_seq", "act_embed")
ACT_HEADS = ("act_batch", "act_seq", "act_heads", "act_head_dim")
CACHE = ("layers",) + ACT_HEADS


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm without scale or bias, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes)


def _trunc(std: float):
    return jax.nn.initializers.truncated_normal(std, lower=-3.0, upper=3.0)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.qkv = _param(rngs, _trunc(cfg.init_std), (d, 3, h, hd),
                          ("embed", "qkv", "heads", "head_dim"))
        self.out = _param(rngs, jax.nn.initializers.zeros, (h, hd, d),
                          ("heads", "head_dim", "embed"))
        if cfg.qk_norm:  # per-head scale, statistics over head_dim (as Chameleon)
            self.q_scale = _param(rngs, jax.nn.initializers.ones, (h, hd), ("heads", "head_dim"))
            self.k_scale = _param(rngs, jax.nn.initializers.ones, (h, hd), ("heads", "head_dim"))
        self.qk_norm = cfg.qk_norm
        self.kernel = cfg.attention  # model/attention.py

    def _project(self, x: jax.Array, rope):
        q, k, v = jnp.einsum("btd,dshk->sbthk", x, self.qkv[...].astype(x.dtype))
        if self.qk_norm:
            q = layer_norm(q) * self.q_scale[...].astype(x.dtype)
            k = layer_norm(k) * self.k_scale[...].astype(x.dtype)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        return tuple(constrain(a, ACT_HEADS) for a in (q, k, v))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None, rope) -> jax.Array:
        q, k, v = self._project(x, rope)
        o = attention.attend(q, k, v, segment_ids, self.kernel)
        return jnp.einsum("bthk,hkd->btd", o, self.out[...].astype(x.dtype))

    def extend(self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, start,
               mask: jax.Array, rope):
        """Attention of T new tokens written at cache column `start`; returns the output
        and the new keys and values [B, T, H, hd] (the caller writes them into the cache)."""
        q, k, v = self._project(x, rope)
        k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
        keys, values = write_at(cache_k, k, start, 1), write_at(cache_v, v, start, 1)
        o = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                         mask=mask)
        return jnp.einsum("bthk,hkd->btd", o, self.out[...].astype(x.dtype)), k, v


def rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, head_dim / 2] of each position's rotation angles, float32."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """x [B, T, H, hd] with each pair (i, i + hd/2) rotated by its position's angle (the
    half-split layout of GPT-NeoX and LLaMA in transformers), so q.k depends on offsets."""
    cos, sin = rope
    a, b = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def write_at(cache: jax.Array, new: jax.Array, start, axis: int) -> jax.Array:
    """`new` written into `cache` from column `start` along `axis`: one column for every
    row (a scalar), or each row its own (`start` [B]; rows on the axis before `axis`)."""
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, start, axis)
    row = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=axis - 1)
    return jax.vmap(row, in_axes=(axis - 1, axis - 1, 0), out_axes=axis - 1)(cache, new, start)


class FeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.w_in = _param(rngs, _trunc(cfg.init_std), (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        self.w_out = _param(rngs, jax.nn.initializers.zeros, (cfg.d_ff, cfg.d_model),
                            ("mlp", "embed"))
        self.act = jax.nn.relu if cfg.activation == "relu" else jax.nn.gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(x @ self.w_in[...].astype(x.dtype))
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        return h @ self.w_out[...].astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs)
        self.ffn = FeedForward(cfg, rngs)
        self.swin_norm = cfg.swin_norm

    def _apply(self, x: jax.Array, attend) -> jax.Array:
        if self.swin_norm:
            x = x + layer_norm(attend(x))
            x = x + layer_norm(self.ffn(x))
        else:
            x = x + attend(layer_norm(x))
            x = x + self.ffn(layer_norm(x))
        return constrain(x, ACT)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None, rope) -> jax.Array:
        return self._apply(x, lambda h: self.attn(h, segment_ids, rope))

    def extend(self, x, cache_k, cache_v, start, mask, rope):
        new = {}

        def attend(h):
            o, new["k"], new["v"] = self.attn.extend(h, cache_k, cache_v, start, mask, rope)
            return o

        return self._apply(x, attend), new["k"], new["v"]


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S columns, and the segment id of each column.

    Column j of row b holds that row's j-th token; segment 0 marks padding (never attended
    to by real tokens), so prompts of different lengths share one static-shape cache.
    """
    k: jax.Array  # [layers, B, S, heads, head_dim]
    v: jax.Array
    segment_ids: jax.Array  # [B, S] int32

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
        shape = (cfg.n_layers, batch, length, cfg.n_heads, cfg.head_dim)
        kv = constrain(jnp.zeros(shape, cfg.dtype), CACHE)
        return cls(kv, kv, jnp.zeros((batch, length), jnp.int32))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, _trunc(cfg.init_std), (vocab_size, cfg.d_model),
                            ("vocab", "embed"))
        if cfg.positions == "learned":
            self.pos = _param(rngs, _trunc(cfg.pos_init_std), (cfg.max_seq_len, cfg.d_model),
                              ("pos", "embed"))
        if not cfg.tie_embeddings:
            self.head = _param(rngs, _trunc(cfg.init_std), (cfg.d_model, vocab_size),
                               ("embed", "vocab"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)

    @property
    def dtype(self):
        return jnp.dtype(self.cfg.dtype)

    def _embed(self, tokens: jax.Array, positions: jax.Array):
        """Input activations, and the rotary angles the layers apply (None: learned table)."""
        x = jnp.take(self.embed[...], tokens, axis=0)
        rope = None
        if self.cfg.positions == "learned":
            x = x + jnp.take(self.pos[...], positions, axis=0)
        else:
            rope = rotary(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return constrain(x.astype(self.dtype), ACT), rope

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D]; `logits` turns them into scores.

        `segment_ids` (packed rows): tokens attend only within their own segment.
        """
        x, rope = self._embed(tokens, positions)

        def block_fn(x, block):
            return block(x, segment_ids, rope)

        if self.cfg.remat != "none":
            block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[self.cfg.remat],
                                 prevent_cse=False)
        x = nnx.scan(block_fn, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        return layer_norm(x)

    def extend(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache, start) -> tuple[jax.Array, KVCache]:
        """Hidden states of T new tokens per row placed at cache columns [start, start+T),
        attending to the cached columns before them (and each other, causally) of their own
        segment; returns them and the cache with their keys and values written in. `start`
        is one column for all rows, or [B] (each row its own: speculative decoding).

        The same layer code as `__call__`, so prefill (T = prompt) and each decoding step
        (T = 1) compute what the full forward pass computes for those positions.
        """
        x, rope = self._embed(tokens, positions)
        T, S = tokens.shape[1], cache.segment_ids.shape[1]
        kv_seg = write_at(cache.segment_ids, segment_ids, start, 1)
        first = jnp.reshape(start, (-1, 1, 1))  # [1 or B, 1, 1]
        causal = jnp.arange(S)[None, None, :] <= first + jnp.arange(T)[None, :, None]
        mask = causal[:, None] & (segment_ids[:, None, :, None] == kv_seg[:, None, None, :])
        graphdef, blocks = nnx.split(self.blocks)

        def layer(x, xs):
            params, ck, cv = xs
            x, k, v = nnx.merge(graphdef, params).extend(x, ck, cv, start, mask, rope)
            return x, (k, v)

        x, (k, v) = jax.lax.scan(layer, x, (blocks, cache.k, cache.v))
        write = lambda c, n: constrain(write_at(c, n, start, 2), CACHE)
        return layer_norm(x), KVCache(write(cache.k, k), write(cache.v, v), kv_seg)

    def token_logprobs(self, tokens: jax.Array) -> jax.Array:
        """[B, T] rows (one document each, from position 0) -> [B, T-1] float32
        log p(tokens[:, t+1] | tokens[:, :t+1]); padding after a row's end never reaches
        its real positions (causal attention)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits = self.logits(self(tokens, positions)[:, :-1])
        target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 scores over the whole (padded) vocabulary."""
        if self.cfg.tie_embeddings:
            w = self.embed[...].astype(hidden.dtype)
            out = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = self.head[...].astype(hidden.dtype)
            out = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_seq", "act_vocab"))
