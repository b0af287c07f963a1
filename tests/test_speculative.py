"""Speculative Jacobi decoding: greedy SJD is greedy autoregressive decoding token for token,
sampled SJD keeps autoregressive decoding's distribution, and repeated tokens take fewer
forward passes than tokens."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from cm3leon_jax.config import ConfigError, GenerateConfig, MeshConfig
from cm3leon_jax.generate import prompts
from cm3leon_jax.generate.decode import Decoding, Scales, decode
from cm3leon_jax.parallel.mesh import make_mesh
from cm3leon_jax.train.state import model_def
from test_generate import tiny_decoder


@pytest.fixture(scope="module")
def setup():
    cfg, graphdef, params, vocab, captions = tiny_decoder()
    return graphdef, params, vocab, captions, cfg


def cfg_streams(vocab, captions):
    pairs = [prompts.text_to_image(vocab, c) for c in captions]
    return [[p[0] for p in pairs], [p[1] for p in pairs]]


def both(setup, streams, d, window, scales=Scales(cfg=3.0), **kw):
    graphdef, params, vocab = setup[:3]
    ar = decode(graphdef, params, vocab, streams, d, scales, **kw)
    sjd, passes = decode(graphdef, params, vocab, streams,
                         dataclasses.replace(d, jacobi_window=window), scales, forwards=True,
                         **kw)
    return ar, sjd, passes


@pytest.mark.parametrize("guidance", ["none", "cfg", "two_scale"])
def test_greedy_sjd_is_greedy_autoregressive(setup, guidance):
    """Three prompts of different lengths (left padding) in one batch, each guidance (CFG
    with CD-K on two samples); the rows accept different counts a pass."""
    vocab, captions = setup[2], setup[3]
    streams, cdk, scales = cfg_streams(vocab, captions), None, Scales(cfg=3.0)
    if guidance == "none":
        streams = streams[:1]
    elif guidance == "cfg":
        cdk = [False, True, False]
    else:
        source = vocab.image_ids(np.arange(7) * 31 % vocab.image_size)
        triples = [prompts.edit_image(vocab, c, source) for c in captions]
        streams = [[t[i] for t in triples] for i in range(3)]
        scales = Scales(image=1.5, text=4.0)
    d = Decoding("image", 24, temperature=0, guidance=guidance)
    ar, sjd, passes = both(setup, streams, d, 5, scales, use_cdk=cdk)
    np.testing.assert_array_equal(sjd, ar)
    assert len({tuple(r) for r in ar}) == 3 and (passes <= 24).all()


def test_sharded_sjd_is_greedy_autoregressive(setup):
    """Over an 8-way batch mesh (as `tasks.load_model` lays a model out), rows padded."""
    graphdef, params, vocab, captions, cfg = setup
    mesh = make_mesh(MeshConfig(2, 4, 1))
    sharded = jax.device_put(params, model_def(cfg).param_shardings(mesh))
    d = Decoding("image", 12, temperature=0, guidance="cfg", jacobi_window=4)
    streams = cfg_streams(vocab, captions)
    got = decode(graphdef, sharded, vocab, streams, d, Scales(cfg=3.0), mesh=mesh)
    ar = decode(graphdef, params, vocab, streams, dataclasses.replace(d, jacobi_window=0),
                Scales(cfg=3.0))
    np.testing.assert_array_equal(got, ar)


def test_repeated_tokens_take_fewer_passes(setup):
    """With every image id given one embedding row (tied: one output score too), image
    tokens no longer depend on each other, so a pass accepts every draft the pass before
    updated: windows (W = 8) whose drafts are all uniform give 1 token and 7 updated drafts,
    the next pass accepts those 7 and redraws its one uniform draft: 9 tokens per 2 passes,
    32 tokens in 8 passes (a uniform draft that happens to be right only saves passes).
    Unmodified, this model copies its last token, which Jacobi iteration propagates by
    one index a pass: no saving (31 passes for 32 tokens)."""
    graphdef, params, vocab, captions, _ = setup
    embed = np.array(params["embed"])
    ids = np.flatnonzero(vocab.is_image(np.arange(embed.shape[0])))
    embed[ids] = embed[ids].mean(0)
    flat = (graphdef, {**params, "embed": embed}, vocab)
    d = Decoding("image", 32, temperature=0, guidance="cfg")
    ar, sjd, passes = both(flat, cfg_streams(vocab, captions[:2]), d, 8)
    np.testing.assert_array_equal(sjd, ar)
    assert (ar == ar[:, :1]).all()  # the repeated token
    assert (passes <= 8).all(), passes


def test_sampled_sjd_keeps_the_distribution(setup):
    """Joint distribution of the first three image tokens of one prompt (CFG, temperature
    1.2, top-k 3: at most 27 outcomes) over 1500 samples each: SJD's counts and
    autoregressive decoding's pass a chi-square test of homogeneity (fixed seeds)."""
    vocab, captions = setup[2], setup[3]
    n = 1500
    streams = cfg_streams(vocab, [captions[1]] * n)
    d = Decoding("image", 3, temperature=1.2, top_k=3, guidance="cfg")
    ar, sjd, passes = both(setup, streams, d, 3, seed=1)
    outcomes = sorted({tuple(r) for r in ar} | {tuple(r) for r in sjd})
    index = {o: i for i, o in enumerate(outcomes)}
    table = np.zeros((2, len(outcomes)))
    for row, out in enumerate((ar, sjd)):
        for r in out:
            table[row, index[tuple(r)]] += 1
    table = table[:, table.sum(0) >= 10]  # chi-square needs expected counts of ~5+
    assert table.shape[1] >= 6  # a real distribution, not a point mass
    assert stats.chi2_contingency(table).pvalue > 0.01
    assert (passes >= 1).all() and (passes <= 3).all()


def test_config_checks_the_window():
    GenerateConfig(speculative=True, jacobi_window=2).check()
    GenerateConfig(speculative=False, jacobi_window=1).check()  # unused when off
    with pytest.raises(ConfigError, match="generate.jacobi_window=1"):
        GenerateConfig(speculative=True, jacobi_window=1).check()
    with pytest.raises(ValueError, match="mode='image'"):
        Decoding("text", 4, jacobi_window=4)


def test_generate_speculative_switches_the_tasks_to_sjd(setup):
    """`generate.speculative` reaches text->image through the tasks: greedy, the same codes
    as one token at a time."""
    from cm3leon_jax.generate import tasks

    graphdef, params, vocab, captions, cfg = setup
    model = tasks.Model(graphdef, params, vocab, cfg.model.max_seq_len)
    g = GenerateConfig(temperature=0, cfg_scale=3.0)
    seen = []
    real = tasks.decode
    spec = dataclasses.replace(g, speculative=True, jacobi_window=4)
    try:
        tasks.decode = lambda *a, **kw: seen.append(a[4].jacobi_window) or real(*a, **kw)
        one = tasks.text_to_image(model, captions, 8, g)
        sjd = tasks.text_to_image(model, captions, 8, spec)
    finally:
        tasks.decode = real
    assert seen == [0, 4]
    np.testing.assert_array_equal(sjd, one)
