import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax.config import load_config
from cm3leon_jax.model.transformer import Transformer
from cm3leon_jax.train.state import init_params, model_def
from conftest import CONFIGS


def build(cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg.model, cfg.vocab.build().size, rngs=nnx.Rngs(seed))


def logits(model, tokens, positions=None, segments=None):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.logits(model(tokens, positions, segments))


def trained_like(model, seed=1):
    """Fill the zero-initialised projections so every path carries signal."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not np.any(np.asarray(var[...])):
            var[...] = jnp.asarray(rng.normal(0, 0.05, var[...].shape), jnp.float32)
    return model


def test_init_follows_the_recipe(tiny):
    cfg = tiny("model.d_model=128", "model.d_ff=512", "model.max_seq_len=128")
    p = init_params(cfg, 0)
    blocks = p["blocks"]
    assert not np.any(blocks["attn"]["out"]) and not np.any(blocks["ffn"]["w_out"])
    for w, std in [(p["embed"], 0.006), (blocks["attn"]["qkv"], 0.006),
                   (blocks["ffn"]["w_in"], 0.006), (p["pos"], 0.0002)]:
        w = np.asarray(w)
        assert np.abs(w).max() <= 3 * std + 1e-9  # truncated at 3 std
        # truncation at 3 std leaves 98.7% of the untruncated variance
        assert np.std(w) == pytest.approx(std * np.sqrt(0.9733), rel=0.05)
    assert set(p) == {"embed", "pos", "blocks"}  # tied: no separate head, no biases, no LN params


def test_param_count_matches_the_built_model():
    for overrides in ([], ["model.qk_norm=true"], ["model.tie_embeddings=false"],
                      ["model.positions=rope"]):
        cfg = load_config(CONFIGS / "tiny.yaml", overrides + ["model.n_layers=3"])
        mdef = model_def(cfg)
        built = sum(x.size for x in jax.tree.leaves(mdef.abstract_params))
        assert cfg.model.param_counts(cfg.vocab.build().size)["total"] == built


def test_paper_sizes_and_flops():
    nominal = {"cm3leon_350m": 350e6, "cm3leon_760m": 760e6, "cm3leon_7b": 7e9}
    for name, n in nominal.items():
        cfg = load_config(CONFIGS / f"{name}.yaml")
        total = cfg.model.param_counts(cfg.vocab.build().size)["total"]
        assert abs(total / n - 1) < 0.10, (name, total)
    cfg = load_config(CONFIGS / "cm3leon_350m.yaml")
    # 6 * (24 layers * 12 d^2 + vocab * d) + 6 * layers * seq * d, written out by hand
    assert cfg.model.flops_per_token(65152, 4096) == 6 * (24 * 12 * 1024**2 + 65152 * 1024) + 6 * 24 * 4096 * 1024


@pytest.mark.parametrize("overrides", [[], ["model.qk_norm=true"], ["model.swin_norm=true"],
                                       ["model.activation=gelu", "model.tie_embeddings=false"],
                                       ["model.positions=rope", "model.qk_norm=true"]])
def test_causal(tiny, overrides):
    model = trained_like(build(tiny(*overrides)))
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(0, 1000, (2, 32)), jnp.int32)
    b = a.at[:, 20:].set(jnp.asarray(rng.integers(0, 1000, (2, 12)), jnp.int32))
    la, lb = logits(model, a), logits(model, b)
    np.testing.assert_allclose(la[:, :20], lb[:, :20], atol=1e-5)
    assert not np.allclose(la[:, 20:], lb[:, 20:], atol=1e-3)


def test_rope_sees_offsets_only(tiny):
    """Rotary positions: shifting every position by one constant leaves the logits as they
    are (attention reads offsets), and the rotation is what transformers' LLaMA applies."""
    cfg = tiny("model.positions=rope")
    model = trained_like(build(cfg))
    assert not hasattr(model, "pos")
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 1000, (2, 24)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    base = logits(model, tokens, pos)
    change = lambda m, p, ref: float(jnp.abs(logits(m, tokens, p) - ref).max())
    shifted, stretched = change(model, pos + 37, base), change(model, pos * 2, base)
    assert shifted < 1e-6 and stretched > 1e-4  # 8e-8 and 2.6e-4 measured
    learned = trained_like(build(tiny()))
    assert change(learned, pos + 37, logits(learned, tokens, pos)) > 1e-4
    # the rotation written out with complex numbers: pair (i, i + hd/2) is re + i*im
    from cm3leon_jax.model.transformer import rotary, rotate
    x = np.random.default_rng(4).normal(size=(1, 5, 2, 8)).astype(np.float32)
    p = np.array([[0, 1, 7, 100, 4000]])
    got = np.asarray(rotate(jnp.asarray(x), rotary(jnp.asarray(p), 8, 10000.0)))
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(
        1j * p[..., None, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8))
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-4)


def test_packed_segments_equal_separate_rows(tiny):
    model = trained_like(build(tiny()))
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 1000, 12), rng.integers(0, 1000, 20)
    packed = jnp.asarray(np.concatenate([x, y, [0, 0]])[None], jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(12), np.arange(20), [0, 0]])[None], jnp.int32)
    seg = jnp.asarray(np.array([1] * 12 + [2] * 20 + [0, 0])[None], jnp.int32)
    lp = logits(model, packed, pos, seg)
    lx = logits(model, jnp.asarray(x[None], jnp.int32))
    ly = logits(model, jnp.asarray(y[None], jnp.int32))
    np.testing.assert_allclose(lp[0, :12], lx[0], atol=1e-5)
    np.testing.assert_allclose(lp[0, 12:32], ly[0], atol=1e-5)


def test_bfloat16_compute_tracks_float32(tiny):
    model32 = trained_like(build(tiny()))
    model16 = trained_like(build(tiny("model.dtype=bfloat16")))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 1000, (2, 32)), jnp.int32)
    l32, l16 = logits(model32, tokens), logits(model16, tokens)
    assert l16.dtype == jnp.float32
    rel = jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32)
    assert rel < 2e-2


def test_same_seed_same_params_different_seed_different(tiny):
    a, b, c = init_params(tiny(), 0), init_params(tiny(), 0), init_params(tiny(), 1)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a["embed"], c["embed"])
