"""Decoding: the KV cache equals full recomputation, guidance and CD-K follow their
formulas, constrained modes hold, sampling filters, prompts, reranking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax.config import GenerateConfig, MeshConfig
from cm3leon_jax.generate import prompts, tasks
from cm3leon_jax.generate.decode import (Decoding, Scales, allowed_ids, cdk_scores, cfg_logits,
                                         choose, decode, top_k_filter, top_p_filter,
                                         two_scale_logits)
from cm3leon_jax.generate.rerank import rerank
from cm3leon_jax.parallel.mesh import make_mesh
from cm3leon_jax.train.state import model_def
from test_model import build, trained_like


def tiny_decoder(*overrides):
    """(cfg, graphdef, params, vocab, captions): a tiny model with every path carrying
    signal, and three captions of different lengths."""
    from cm3leon_jax.config import load_config
    from conftest import CONFIGS
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.qk_norm=true", *overrides])
    graphdef, state = nnx.split(trained_like(build(cfg)))
    vocab = cfg.vocab.build()
    rng = np.random.default_rng(0)
    captions = [vocab.text_ids(rng.integers(0, vocab.text_size, n)) for n in (1, 6, 11)]
    return cfg, graphdef, nnx.to_pure_dict(state), vocab, captions


@pytest.fixture(scope="module")
def setup():
    return tiny_decoder()


def run(setup, streams, d, scales=Scales(), **kw):
    cfg, graphdef, params, vocab, _ = setup
    return decode(graphdef, params, vocab, streams, d, scales, **kw)


def image_streams(setup):
    vocab, captions = setup[3], setup[4]
    pairs = [prompts.text_to_image(vocab, c) for c in captions]
    return [[p[0] for p in pairs], [p[1] for p in pairs]]


# --- the cache ---------------------------------------------------------------------------

IMAGE_CFG = Decoding("image", 10, temperature=0, guidance="cfg")  # shared: one compile
CDK_ROWS = [False, True, True]  # sample 0 top-p + CFG, samples 1, 2 CD-K


def edit_streams(setup):
    vocab, captions = setup[3], setup[4]
    source = vocab.image_ids(np.arange(7) * 31 % vocab.image_size)
    triples = [prompts.edit_image(vocab, c, source) for c in captions]
    return [[t[i] for t in triples] for i in range(3)]


@pytest.mark.parametrize("kind", ["text", "cfg_cdk", "two_scale"])
def test_cached_decoding_equals_full_recomputation(setup, kind):
    """Greedy tokens of prefill + KV-cache steps == recomputing every prefix with the
    training forward pass, for prompts of different lengths (left padding) in a batch,
    with separate caches per guidance stream."""
    vocab = setup[3]
    cdk, scales = None, Scales()
    if kind == "text":  # prompts that end in text, of lengths 2..12
        streams = [[np.concatenate([[vocab.eos], c]) for c in setup[4]]]
        d = Decoding("text", 14, temperature=0, stop=(vocab.eos, vocab.brk, vocab.eoss))
    elif kind == "cfg_cdk":
        streams, d, cdk, scales = image_streams(setup), IMAGE_CFG, CDK_ROWS, Scales(cfg=3.0)
    else:
        streams = edit_streams(setup)
        d, scales = Decoding("image", 8, temperature=0, guidance="two_scale"), Scales(
            image=1.5, text=4.0)
    cached = run(setup, streams, d, scales, use_cdk=cdk)
    full = run(setup, streams, d, scales, use_cdk=cdk, cached=False)
    np.testing.assert_array_equal(cached, full)
    assert len({tuple(r) for r in cached}) == 3  # the prompts lead to different tokens


def test_cached_decoding_with_rotary_positions_equals_full_recomputation():
    """The cache holds rotated keys: each decoding step rotates its query by its own
    position, and left-padded rows (positions from 0 at their first token) agree."""
    setup = tiny_decoder("model.positions=rope")
    vocab = setup[3]
    streams = [[np.concatenate([[vocab.eos], c]) for c in setup[4]]]
    d = Decoding("text", 14, temperature=0, stop=(vocab.eos, vocab.brk, vocab.eoss))
    cached = run(setup, streams, d)
    np.testing.assert_array_equal(cached, run(setup, streams, d, cached=False))
    assert len({tuple(r) for r in cached}) == 3


def test_guidance_endpoints_are_each_stream_decoded_alone(setup):
    """Scale 1 is plain decoding of the conditional prompt; scale 0 is plain decoding of
    the unconditional prompt. The second fails if the unconditional stream ever sees the
    conditional cache (DALLE-pytorch's bug)."""
    cond, uncond = image_streams(setup)
    uncond = [np.concatenate([u, c[1:2]]) for u, c in zip(uncond, cond)]  # distinct rows
    plain = run(setup, [cond + uncond], Decoding("image", 10, temperature=0))
    guided = lambda s: run(setup, [cond, uncond], IMAGE_CFG, Scales(cfg=s))
    np.testing.assert_array_equal(guided(1.0), plain[:3])
    np.testing.assert_array_equal(guided(0.0), plain[3:])
    assert not np.array_equal(plain[:3], plain[3:])


def test_sharded_decoding_equals_single_device(setup):
    cfg, graphdef, params, vocab, _ = setup
    mesh = make_mesh(MeshConfig(2, 4, 1))  # 8-way batch split: 3 samples x 2 streams -> 8 rows
    sharded = jax.device_put(params, model_def(cfg).param_shardings(mesh))
    streams, scales = image_streams(setup), Scales(cfg=3.0)
    got = decode(graphdef, sharded, vocab, streams, IMAGE_CFG, scales, mesh=mesh,
                 use_cdk=CDK_ROWS)
    np.testing.assert_array_equal(got, run(setup, streams, IMAGE_CFG, scales, use_cdk=CDK_ROWS))


# --- formulas, pinned with hand-set logits ---------------------------------------------

def test_cfg_formula():
    cond, uncond = jnp.array([2.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 1.0])
    np.testing.assert_allclose(cfg_logits(cond, uncond, 3.0), [4.0, -2.0, 1.0])
    full, img, u = jnp.array([3.0, 0.0]), jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0])
    # u + 1.5 (img - u) + 7.5 (full - img)
    np.testing.assert_allclose(two_scale_logits(full, img, u, 1.5, 7.5),
                               [0 + 1.5 * 1 + 7.5 * 2, 1 + 1.5 * 1 + 7.5 * -2])


def test_cdk_formula_and_its_k():
    p_cond = np.array([0.5, 0.3, 0.15, 0.05])
    p_uncond = np.array([0.5, 0.3, 0.05, 0.15])
    lc, lu = jnp.log(p_cond), jnp.log(p_uncond)
    # K = 1 (plain CD): head = p >= 0.5 * 0.5 -> tokens 0, 1; both score log 1 = 0
    s1 = cdk_scores(lc, lu, 0.5, 1)
    np.testing.assert_allclose(s1, [0.0, 0.0, -np.inf, -np.inf], atol=1e-6)
    # K = 2: head = p >= 0.5 * 0.3 -> tokens 0, 1, 2; token 2 scores log 3
    s2 = cdk_scores(lc, lu, 0.5, 2)
    np.testing.assert_allclose(s2, [0.0, 0.0, np.log(3.0), -np.inf], atol=1e-6)
    assert int(jnp.argmax(s2)) == 2


def test_choose_mixes_streams_then_restricts(setup):
    """choose() on hand-set [cond; uncond] logits: CFG flips the greedy choice, CD-K takes
    the best contrast inside the head, disallowed ids are never picked."""
    vocab = setup[3]
    V = vocab.size
    a, b, c = (vocab.image_offset + i for i in (0, 1, 2))
    t = vocab.text_offset
    cond = np.full(V, -10.0)
    uncond = np.full(V, -10.0)
    cond[[a, b, c, t]] = [3.0, 2.9, 1.0, 50.0]
    uncond[[a, b, c, t]] = [3.0, 1.0, -1.0, 50.0]
    logits = jnp.asarray(np.stack([cond, uncond]))
    allowed = jnp.asarray(allowed_ids(vocab, "image"))
    key = jax.random.key(0)
    d = Decoding("image", 1, temperature=0, guidance="cfg", cd_k=1)
    pick = lambda cd, **s: int(choose(logits, key, jnp.array([cd]), allowed, d, Scales(**s))[0])
    assert pick(False, cfg=1.0) == a  # plain: 3.0 > 2.9 (the text id is not allowed)
    assert pick(False, cfg=2.0) == b  # a: 3, b: 1 + 2 * 1.9 = 4.8, c: -1 + 2 * 2 = 3
    # CD-K, K = 1: contrasts (cond - uncond) a 0, b 1.9, c 2. At alpha 0.1 (log -2.3) the
    # head is {a, b, c} (c is 2.0 below a), so c wins; at alpha 0.5 (log -0.69) only {a, b}.
    assert pick(True, cd_alpha=0.1) == c
    assert pick(True, cd_alpha=0.5) == b


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3]))
    assert np.isfinite(top_k_filter(logits, 2)).tolist() == [False, True, False, True]
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [False, True, False, True]
    assert np.isfinite(top_p_filter(logits, 0.7)).tolist() == [False, True, False, True]
    assert np.isfinite(top_p_filter(logits, 0.71)).tolist() == [False, True, True, True]
    assert np.isfinite(top_p_filter(logits, 0.01)).tolist() == [False, True, False, False]


# --- constrained modes -------------------------------------------------------------------

def test_image_mode_gives_exactly_n_image_tokens(setup):
    vocab = setup[3]
    streams = image_streams(setup)
    d = Decoding("image", 10, temperature=2.0, guidance="cfg")
    for seed in range(3):
        out = run(setup, streams, d, Scales(cfg=2.0), seed=seed, use_cdk=CDK_ROWS)
        assert out.shape == (3, 10) and vocab.is_image(out).all()
    free = run(setup, streams[:1], Decoding("free", 10, temperature=2.0))
    assert not vocab.is_image(free).all()  # unconstrained, the model does emit other ids


def test_text_mode_never_emits_image_ids_and_stops(setup):
    vocab = setup[3]
    rows = [[np.concatenate([[vocab.eos], c]) for c in setup[4]]]
    stop = (vocab.eos, vocab.brk, vocab.eoss)
    for seed in range(3):
        out = run(setup, rows, Decoding("text", 24, temperature=3.0, stop=stop), seed=seed)
        assert not vocab.is_image(out).any()
        for row in out:
            ends = np.flatnonzero(np.isin(row, stop))
            if ends.size:
                assert (row[ends[0] + 1:] == vocab.pad).all()
            assert (row[:ends[0] + 1 if ends.size else None] != vocab.pad).all()


def test_min_tokens_defers_every_stop_and_special_id(setup):
    """Hand-set logits ranking <eoss>, then <mask:0>, then one text piece: before min_tokens
    only the text piece is allowed; from then on the stop wins."""
    from cm3leon_jax.generate.decode import _next

    vocab = setup[3]
    piece = int(vocab.text_ids(np.array([7]))[0])
    logits = jnp.full((1, vocab.size), -5.0).at[0, vocab.eoss].set(9.0)
    logits = logits.at[0, vocab.sentinel(0)].set(8.0).at[0, piece].set(1.0)
    d = Decoding("text", 4, temperature=0.0, stop=(vocab.eoss,), min_tokens=2)
    allowed = jnp.asarray(allowed_ids(vocab, "text"))
    done = jnp.zeros(1, bool)
    got = []
    for t in range(4):
        token, done = _next(logits, t, jax.random.key(0), jnp.zeros(1, bool), Scales(), done,
                            allowed, vocab, d)
        got.append(int(token[0]))
    assert got == [piece, piece, vocab.eoss, vocab.pad]
    with pytest.raises(ValueError, match="min_tokens=5 must be in"):
        Decoding("text", 4, min_tokens=5)


# --- prompts, tasks, reranking -------------------------------------------------------------

def test_image_from_streams_at_neutral_scales_is_the_conditional_stream(setup):
    """Scale 1 mixes back to the conditional logits, so the extra streams are not decoded;
    at other scales they are (the result differs)."""
    cfg, graphdef, params, vocab, captions = setup
    model = tasks.Model(graphdef, params, vocab, cfg.model.max_seq_len)
    pairs = [prompts.text_to_image(vocab, c) for c in captions]
    cond, uncond = [p[0] for p in pairs], [p[1] for p in pairs]
    g = GenerateConfig(temperature=0, cfg_scale=1.0, image_cfg_scale=1.0, text_cfg_scale=1.0)
    alone = tasks.image_from_streams(model, [cond], 6, g)
    np.testing.assert_array_equal(tasks.image_from_streams(model, [cond, uncond], 6, g), alone)
    np.testing.assert_array_equal(
        tasks.image_from_streams(model, [cond, uncond, uncond], 6, g), alone)
    guided = tasks.image_from_streams(model, [cond, uncond], 6,
                                      dataclasses.replace(g, cfg_scale=3.0))
    assert guided.shape == alone.shape and not np.array_equal(guided, alone)
    with pytest.raises(ValueError, match="4 prompt streams"):
        tasks.image_from_streams(model, [cond] * 4, 6, g)


def test_prompt_layouts(setup):
    vocab = setup[3]
    t = vocab.text_ids([4, 5])
    im = vocab.image_ids([7, 8, 9])
    m0 = vocab.sentinel(0)
    cond, uncond = prompts.text_to_image(vocab, t)
    assert cond.tolist() == [vocab.eos, *t, vocab.brk]
    assert uncond.tolist() == [vocab.eos, m0, vocab.brk]
    assert prompts.image_to_text(vocab, im).tolist() == [vocab.eos, m0, vocab.brk, *im,
                                                          vocab.eos, m0]
    assert prompts.infill(vocab, t[:1], t[1:]).tolist() == [vocab.eos, t[0], m0, t[1],
                                                            vocab.eos, m0]
    full, u, img = prompts.edit_image(vocab, t, im)
    assert full.tolist() == [vocab.eos, *t, vocab.brk, *im, vocab.brk]
    assert img.tolist() == [vocab.eos, m0, vocab.brk, *im, vocab.brk]
    with pytest.raises(ValueError, match="caption: id .* is not a text id"):
        prompts.text_to_image(vocab, im)
    assert prompts.text_answer(vocab, [*t, vocab.eoss, *t]).tolist() == t.tolist()


def test_tasks_mixed_pool(setup):
    cfg, graphdef, params, vocab, captions = setup
    model = tasks.Model(graphdef, params, vocab, cfg.model.max_seq_len)
    g = GenerateConfig(temperature=0, candidates=4, pool="mixed", cfg_scale=2.0, cd_k=2)
    codes = tasks.text_to_image(model, captions[:2], 6, g)
    assert codes.shape == (2, 4, 6) and codes.min() >= 0 and codes.max() < vocab.image_size
    # greedy: the top-p half and the CD-K half are each one repeated candidate
    assert (codes[:, 0] == codes[:, 1]).all() and (codes[:, 2] == codes[:, 3]).all()
    cdk = tasks.text_to_image(model, captions[:2], 6, dataclasses.replace(g, pool="cdk"))
    np.testing.assert_array_equal(codes[:, 2:], cdk[:, 2:])
    assert not np.array_equal(codes[:, :2], cdk[:, :2])
    caps = tasks.image_to_text(model, list(codes[:, 0]), GenerateConfig(max_text_tokens=5))
    assert all(vocab.is_text(c).all() and len(c) <= 5 for c in caps)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=128"):
        tasks.text_to_image(model, captions[:1], 126, g)


def test_rerank_keeps_the_best_per_caption():
    cands = [["a1", "a2", "a3"], ["b1", "b2", "b3"]]
    sim = {"a1": 0.1, "a2": 0.9, "a3": 0.5, "b1": 0.7, "b2": 0.2, "b3": 0.8}
    calls = []

    def score(images, captions):
        calls.append((images, captions))
        return [sim[i] + (0.0 if c == "A" else 0.01) for i, c in zip(images, captions)]

    best, scores = rerank(cands, ["A", "B"], score, keep=2)
    assert best.tolist() == [[1, 2], [2, 0]]
    assert calls == [(["a1", "a2", "a3", "b1", "b2", "b3"], ["A"] * 3 + ["B"] * 3)]
    np.testing.assert_allclose(scores[1], [0.71, 0.21, 0.81])
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        rerank(cands, ["A", "B"], lambda i, c: [0.0])


def test_cli_refuses_a_directory_without_a_run(tmp_path, capsys):
    from cm3leon_jax.cli import main
    assert main(["generate", "image", "--workdir", str(tmp_path), "--prompt", "a"]) == 2
    assert "is neither a run directory (no checkpoints/) nor an export" in capsys.readouterr().err
