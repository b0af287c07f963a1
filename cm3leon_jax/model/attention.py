"""Causal self-attention over packed rows, by one of two kernels (`model.attention`):

- `xla`: `jax.nn.dot_product_attention` with a materialised [B, 1, T, T] segment mask; what
  every backend runs, and the CPU default.
- `splash`: the Pallas splash-attention kernel (TPU), which takes the segment ids themselves
  and skips fully masked blocks, so no T x T score matrix is ever stored (MaxText's and
  levanter's TPU path). Inside a mesh it runs per shard (`shard_map` over the batch and head
  axes of parallel.mesh.RULES; attention needs nothing across either). Off TPU it runs in
  Pallas interpret mode: exact, slow, for tests.
- `auto`: splash on TPU for rows it can block (a multiple of 128), else xla. cuDNN's fused attention is not offered yet: its packed
  (segment) layout could not be checked without a GPU.

Both take queries, keys and values [B, T, H, hd] and segment ids [B, T] (None: one segment)
and attend causally within a segment.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cm3leon_jax.config.model import SPLASH_BLOCK, SPLASH_MIN_BLOCK
from cm3leon_jax.parallel.mesh import spec


def resolve(kind: str, seq_len: int) -> str:
    """`auto` -> the kernel of the backend this program is traced for."""
    if kind == "auto":
        fits = seq_len % SPLASH_MIN_BLOCK == 0 and (
            seq_len <= SPLASH_BLOCK or seq_len % SPLASH_BLOCK == 0)
        return "splash" if jax.default_backend() == "tpu" and fits else "xla"
    return kind


def splash_block(seq_len: int) -> int:
    """The kernel's block along the sequence for rows of `seq_len` (which it must divide)."""
    return min(SPLASH_BLOCK, seq_len)


def attend(q, k, v, segment_ids, kind: str):
    """Causal attention of [B, T, H, hd] queries within their segments."""
    if resolve(kind, q.shape[1]) == "splash":
        return splash(q, k, v, segment_ids)
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


def splash(q, k, v, segment_ids):
    """The splash kernel, per shard of the current mesh (or whole, without one)."""
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_local(q, k, v, segment_ids)
    act, seg = spec(("act_batch", "act_seq", "act_heads", "act_head_dim")), spec(
        ("act_batch", "act_seq"))
    return jax.shard_map(_splash_local, mesh=mesh, in_specs=(act, act, act, seg),
                         out_specs=act, check_vma=False)(q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids):
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # Pallas: load on use
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

    _, T, H, hd = q.shape
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((T, T)) for _ in range(H)])
    b = splash_block(T)
    blocks = kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                                   block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                                   block_kv_dq=b)
    kernel = kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1,
                                        q_seq_shards=1,
                                        interpret=jax.default_backend() != "tpu")
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, H, T, hd]
    out = jax.vmap(kernel)(heads_first(q * (hd ** -0.5)).astype(q.dtype), heads_first(k),
                           heads_first(v),
                           segment_ids=kernel_lib.SegmentIds(segment_ids, segment_ids))
    return heads_first(out)
