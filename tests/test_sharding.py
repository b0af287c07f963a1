"""One step on several meshes of the 8 host devices equals the single-device step."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cm3leon_jax.config import MeshConfig
from cm3leon_jax.parallel.mesh import make_mesh, spec
from cm3leon_jax.train.state import create_state, state_layout
from test_step import batch_of, one_step

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


@pytest.fixture(scope="module")
def reference():
    from cm3leon_jax.config import load_config
    from conftest import CONFIGS
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.qk_norm=true"])
    batch = batch_of(cfg, 8)
    return cfg, batch, one_step(cfg, batch)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_equals_single_device(reference, shape):
    cfg, batch, (ref_state, ref) = reference
    state, got = one_step(cfg, batch, MeshConfig(*shape), jax.devices())
    for k in ("loss", "text_loss", "image_loss", "grad_norm"):
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5)
    # After one AdamW step the update direction is sign-like, so parameters compare tightly.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_layout_follows_the_rule_table(tiny):
    cfg = tiny("model.qk_norm=true", "model.tie_embeddings=false")
    mesh = make_mesh(MeshConfig(2, 2, 2))
    tx, mdef, shardings = state_layout(cfg, mesh)
    with jax.set_mesh(mesh):
        state = create_state(cfg, tx, shardings)
    expected = {
        "embed": P("tensor", "fsdp"),
        "pos": P(None, "fsdp"),
        "head": P("fsdp", "tensor"),
        "blocks/attn/qkv": P(None, "fsdp", None, "tensor", None),
        "blocks/attn/out": P(None, "tensor", None, "fsdp"),
        "blocks/attn/q_scale": P(None, "tensor", None),
        "blocks/ffn/w_in": P(None, "fsdp", "tensor"),
        "blocks/ffn/w_out": P(None, "tensor", "fsdp"),
    }
    flat = {"/".join(k.key for k in path): (x, a) for (path, x), a in zip(
        jax.tree_util.tree_flatten_with_path(state.params)[0],
        jax.tree.leaves(mdef.param_axes, is_leaf=lambda t: isinstance(t, tuple)))}
    mu = state.opt_state[1][0].mu
    for name, want in expected.items():
        x, axes = flat[name]
        assert spec(axes) == want, name
        assert x.sharding.spec == want, name
        # each device really holds a slice: shard shape = global shape / mesh sizes
        sizes = {"data": 2, "fsdp": 2, "tensor": 2, None: 1}
        shard = tuple(d // sizes[s] for d, s in zip(x.shape, tuple(want) + (None,) * (x.ndim - len(want))))
        assert x.addressable_shards[0].data.shape == shard, name
    for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(state.params)):
        assert a.sharding == b.sharding  # AdamW moments live where their parameter lives
    assert flat["blocks/attn/k_scale"][0].sharding.spec == P(None, "tensor", None)


@pytest.mark.slow
def test_rotary_positions_shard_like_the_rest():
    """Rotary angles come from each row's positions, so a (data, fsdp, tensor) mesh that
    splits rows and heads gives the single-device step."""
    from cm3leon_jax.config import load_config
    from conftest import CONFIGS
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.positions=rope"])
    batch = batch_of(cfg, 8)
    ref_state, ref = one_step(cfg, batch)
    state, got = one_step(cfg, batch, MeshConfig(2, 2, 2), jax.devices())
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
