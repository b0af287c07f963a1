"""The CM3Leon decoder (CM3Leon §2.3; gaps filled from metaseq's OPT recipe).

Pre-LN, no biases, no dropout, parameter-free LayerNorm, learned absolute positions,
truncated-normal init (std 0.006 at +-3 std), attention-output and second FFN projections
initialised to zero, ReLU FFN of width d_ff, tied input/output embeddings. Chameleon's
stability options: QK-norm, z-loss (in the loss), swin norm order.

Layers are stacked on a leading `layers` axis and run with a scan, so compile time does
not grow with depth; the remat policy decides what the backward pass recomputes.
Parameters are float32; matmuls run in `model.dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.config import ModelConfig
from cm3leon_jax.parallel.mesh import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ACT = ("act_batch", "act_seq", "act_embed")
ACT_HEADS = ("act_batch", "act_seq", "act_heads", "act_head_dim")


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

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        q, k, v = jnp.einsum("btd,dshk->sbthk", x, self.qkv[...].astype(x.dtype))
        if self.qk_norm:
            q = layer_norm(q) * self.q_scale[...].astype(x.dtype)
            k = layer_norm(k) * self.k_scale[...].astype(x.dtype)
        q, k, v = (constrain(a, ACT_HEADS) for a in (q, k, v))
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
        return jnp.einsum("bthk,hkd->btd", o, self.out[...].astype(x.dtype))


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

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        if self.swin_norm:
            x = x + layer_norm(self.attn(x, mask))
            x = x + layer_norm(self.ffn(x))
        else:
            x = x + self.attn(layer_norm(x), mask)
            x = x + self.ffn(layer_norm(x))
        return constrain(x, ACT)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, _trunc(cfg.init_std), (vocab_size, cfg.d_model),
                            ("vocab", "embed"))
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

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D]; `logits` turns them into scores.

        `segment_ids` (packed rows): tokens attend only within their own segment.
        """
        x = jnp.take(self.embed[...], tokens, axis=0) + jnp.take(self.pos[...], positions, axis=0)
        x = constrain(x.astype(self.dtype), ACT)
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])

        def block_fn(x, block):
            return block(x, mask)

        if self.cfg.remat != "none":
            block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[self.cfg.remat],
                                 prevent_cse=False)
        x = nnx.scan(block_fn, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        return layer_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 scores over the whole (padded) vocabulary."""
        if self.cfg.tie_embeddings:
            w = self.embed[...].astype(hidden.dtype)
            out = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = self.head[...].astype(hidden.dtype)
            out = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_seq", "act_vocab"))
