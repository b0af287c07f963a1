"""The attention kernels agree: splash attention (Pallas, interpret mode on CPU) equals the
XLA path in values and gradients for packed causal rows, alone and per shard of a mesh, and
a whole training step with it equals the XLA step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.config import ConfigError, MeshConfig
from cm3leon_jax.model import attention
from cm3leon_jax.parallel.mesh import make_mesh
from test_step import batch_of, one_step


def packed(rng, B, T, H, hd):
    """Random q, k, v and segment ids of rows packed with 1..4 documents of random lengths
    (segment 0, padding, at the end of some rows)."""
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32) for _ in range(3))
    cuts = [np.sort(rng.choice(np.arange(1, T), size=rng.integers(0, 4), replace=False))
            for _ in range(B)]
    seg = np.stack([np.searchsorted(c, np.arange(T), side="right") + 1 for c in cuts])
    for b in range(B):
        if rng.random() < 0.5:
            seg[b, T - rng.integers(1, T // 4):] = 0
    return q, k, v, jnp.asarray(seg, jnp.int32)


def values_and_grads(kind, q, k, v, seg):
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)  # any fixed cotangent

    def f(q, k, v):
        o = attention.attend(q, k, v, seg, kind)
        return (o * w).sum(), o

    (_, o), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


@pytest.mark.parametrize("seed, T", [(0, 128), (1, 256), (2, 1024)])
def test_splash_equals_xla_values_and_gradients(seed, T):
    q, k, v, seg = packed(np.random.default_rng(seed), 2, T, 2, 16)
    (o_x, g_x), (o_s, g_s) = (jax.jit(values_and_grads, static_argnums=0)(kind, q, k, v, seg)
                              for kind in ("xla", "splash"))
    np.testing.assert_allclose(o_s, o_x, atol=2e-6, rtol=1e-5)
    for a, b in zip(g_s, g_x):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_splash_per_shard_equals_xla_on_a_mesh():
    """Batch over (data, fsdp), heads over tensor: shard_map runs the kernel per shard."""
    q, k, v, seg = packed(np.random.default_rng(3), 4, 128, 4, 8)
    want = jax.jit(values_and_grads, static_argnums=0)("xla", q, k, v, seg)
    with jax.set_mesh(make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])):
        got = jax.jit(values_and_grads, static_argnums=0)("splash", q, k, v, seg)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_a_training_step_with_splash_equals_xla(tiny):
    overrides = ("model.n_layers=2", "data.seq_len=128", "model.dtype=float32")
    base = tiny(*overrides, "model.attention=xla")
    batch = batch_of(base, 8)
    assert len(np.unique(np.asarray(batch["segment_ids"]))) > 2  # packed rows
    want_state, want = one_step(base, batch)
    got_state, got = one_step(tiny(*overrides, "model.attention=splash"), batch,
                              MeshConfig(2, 2, 2), jax.devices()[:8])
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_auto_is_xla_off_tpu():
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto", 1024) == "xla"
    assert attention.resolve("splash", 1024) == "splash"


@pytest.mark.parametrize("seq_len", [100, 640])
def test_splash_refuses_rows_it_cannot_block(tiny, seq_len):
    with pytest.raises(ConfigError, match=rf"model.attention=splash needs data.seq_len \(got "
                                          rf"{seq_len}\)"):
        tiny(f"data.seq_len={seq_len}", "model.max_seq_len=1024", "model.attention=splash")
