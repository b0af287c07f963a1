"""VQ-GAN options of issue 21: l2-normalised and low-dimensional code lookup, GAN losses
(hinge / non-saturating), taming's adaptive weight, LeCam, the LPIPS term, usage and
perplexity."""

import dataclasses
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.config import ConfigError, VQGANConfig, VQGANTrainConfig, load_config
from cm3leon_jax.model.patchgan import PatchGAN
from cm3leon_jax.model.vqgan import VQGAN
from cm3leon_jax.perception import lpips as lpips_lib
from cm3leon_jax.tokenizers.image import (ImageTokenizer, abstract_params, graphdef, init_like,
                                          init_params, to_float)
from cm3leon_jax.tokenizers.image_train import (LECAM_DECAY, adaptive_weight, disc_loss, gen_loss,
                                                learning_rate, lecam_loss, loss_functions,
                                                train_image_tokenizer, usage_and_perplexity)

# One level, no attention: the smallest VQ-GAN, so the programs below compile quickly.
SMALL = VQGANConfig(resolution=8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                    mid_attn=False, norm_groups=4, z_channels=8, embed_dim=4, codebook_size=32)


def _blocks(n, seed, colors=8, r=8, block=2):
    """Images of 2x2 blocks of `colors` random colours (one palette for every seed)."""
    palette = np.random.default_rng(99).integers(0, 256, (colors, 3)).astype(np.uint8)
    grid = np.random.default_rng(seed).integers(0, colors, (n, r // block, r // block))
    return palette[grid].repeat(block, axis=1).repeat(block, axis=2)


def _softplus(x):
    return np.logaddexp(0.0, x)


def test_gan_losses_match_hand_formulas():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(3, 4, 4)) * 2, rng.normal(size=(3, 4, 4)) * 2
    r, f = jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32)
    np.testing.assert_allclose(disc_loss("hinge", r, f),
                               np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean(),
                               rtol=1e-6)
    # logistic: -log sigmoid(D(x)) - log(1 - sigmoid(D(G)))
    sig = 1 / (1 + np.exp(-real)), 1 / (1 + np.exp(-fake))
    np.testing.assert_allclose(disc_loss("non_saturating", r, f),
                               -np.log(sig[0]).mean() - np.log(1 - sig[1]).mean(), rtol=1e-5)
    np.testing.assert_allclose(gen_loss("hinge", f), -fake.mean(), rtol=1e-6)
    np.testing.assert_allclose(gen_loss("non_saturating", f), -np.log(sig[1]).mean(), rtol=1e-5)
    np.testing.assert_allclose(gen_loss("non_saturating", f), _softplus(-fake).mean(), rtol=1e-5)
    # LeCam: E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G))^2]
    ema_real, ema_fake = 0.3, -0.2
    want = (np.maximum(0, real - ema_fake) ** 2).mean() + (np.maximum(0, ema_real - fake) ** 2).mean()
    np.testing.assert_allclose(lecam_loss(r, f, ema_real, ema_fake), want, rtol=1e-5)


def test_adaptive_weight_is_taming_ratio_clipped_and_without_gradient():
    w = jnp.arange(6.0).reshape(2, 3)
    # grad of 3 sum(w^2) = 6w, of sum(w) = 1: ||6w|| / (||1|| + 1e-4)
    want = 6 * np.sqrt(55.0) / (np.sqrt(6.0) + 1e-4)
    np.testing.assert_allclose(adaptive_weight(lambda k: 3 * jnp.sum(k ** 2), jnp.sum, w), want,
                               rtol=1e-6)
    # a GAN loss flat at the last layer: clipped at 1e4
    assert float(adaptive_weight(lambda k: jnp.sum(k ** 2), lambda k: 0.0 * jnp.sum(k), w)) == 1e4
    # detached: no gradient flows into what the losses depend on
    g = jax.grad(lambda s: adaptive_weight(lambda k: s * jnp.sum(k ** 2), jnp.sum, w))(2.0)
    assert float(g) == 0.0


@pytest.mark.slow
def test_trainer_adaptive_weight_equals_a_hand_computation():
    """The trainer's d_weight against both gradient norms taken by jax.grad of the whole model."""
    t = VQGANTrainConfig(disc_weight=0.5, adaptive_weight=True, disc_channels=8, disc_layers=1,
                         recon_loss="l1")
    params = init_params(SMALL, 0)
    dparams = init_like(abstract_params(lambda rngs: PatchGAN(8, 1, rngs=rngs)), 1)
    dgdef = nnx.graphdef(nnx.eval_shape(lambda: PatchGAN(8, 1, rngs=nnx.Rngs(0))))
    x = to_float(jnp.asarray(_blocks(4, seed=0)))

    def recon(p):
        return nnx.merge(graphdef(SMALL), p)(x)[0]

    def rec(p):
        return jnp.mean(jnp.abs(recon(p) - x))

    def gan(p):
        return -jnp.mean(nnx.merge(dgdef, dparams)(recon(p)))

    @jax.jit
    def hand_and_trainer(p, dp):
        last = [jax.grad(f)(p)["decoder"]["conv_out"]["kernel"] for f in (rec, gan)]
        norms = [jnp.sqrt(jnp.sum(g ** 2)) for g in last]
        generator_loss = loss_functions(SMALL, t, gan=True)[0]
        loss, (metrics, *_) = generator_loss(p, dp, x, {})
        return norms, rec(p), gan(p), loss, metrics

    (rec_norm, gan_norm), rec_value, gan_value, loss, m = hand_and_trainer(params, dparams)
    want = 0.5 * np.clip(float(rec_norm) / (float(gan_norm) + 1e-4), 0, 1e4)
    assert 0 < want < 0.5e4  # a ratio inside the clip range, so the test sees it
    np.testing.assert_allclose(m["d_weight"], want, rtol=1e-4)
    np.testing.assert_allclose(m["rec"], rec_value, rtol=1e-6)
    np.testing.assert_allclose(m["gen"], gan_value, rtol=1e-6)
    np.testing.assert_allclose(
        loss, rec_value + m["codebook"] + t.beta * m["commit"] + want * gan_value, rtol=1e-5)


def test_discriminator_loss_adds_lecam_and_moves_its_emas():
    t = VQGANTrainConfig(disc_weight=0.1, disc_loss="non_saturating", lecam_weight=0.7,
                         disc_channels=8, disc_layers=1)
    dparams = init_like(abstract_params(lambda rngs: PatchGAN(8, 1, rngs=rngs)), 1)
    d = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: PatchGAN(8, 1, rngs=nnx.Rngs(0)))),
                  dparams)
    real, fake = (to_float(jnp.asarray(_blocks(2, seed=s))) for s in (0, 1))
    ema = jnp.asarray([0.25, -0.5])
    loss, (metrics, new_ema) = loss_functions(SMALL, t, gan=True)[1](dparams, real, fake, ema)
    lr, lf = np.asarray(d(real)), np.asarray(d(fake))
    adv = _softplus(-lr).mean() + _softplus(lf).mean()
    lecam = (np.maximum(0, lr + 0.5) ** 2).mean() + (np.maximum(0, 0.25 - lf) ** 2).mean()
    np.testing.assert_allclose(metrics["disc"], adv, rtol=1e-5)
    np.testing.assert_allclose(metrics["lecam"], lecam, rtol=1e-5)
    np.testing.assert_allclose(loss, adv + 0.7 * lecam, rtol=1e-5)
    np.testing.assert_allclose(new_ema, LECAM_DECAY * np.array([0.25, -0.5])
                               + (1 - LECAM_DECAY) * np.array([lr.mean(), lf.mean()]), rtol=1e-5)
    # without LeCam the EMAs stay where they are and the loss is the adversarial one alone
    off = dataclasses.replace(t, lecam_weight=0.0)
    loss, (metrics, same) = loss_functions(SMALL, off, gan=True)[1](dparams, real, fake, ema)
    assert "lecam" not in metrics and same is ema
    np.testing.assert_allclose(loss, adv, rtol=1e-5)


def test_usage_and_perplexity():
    assert usage_and_perplexity(np.array([5, 5, 0, 0])) == pytest.approx((0.5, 2.0))
    assert usage_and_perplexity(np.array([1, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx((1 / 8, 1.0))
    p = np.array([1, 2, 3, 4]) / 10
    assert usage_and_perplexity(np.array([1, 2, 3, 4, 0]))[1] == pytest.approx(
        np.exp(-(p * np.log(p)).sum()))


def test_low_dim_l2_lookup_shapes_and_save_load(tmp_path):
    cfg = dataclasses.replace(SMALL, codebook_dim=2, codebook_l2_norm=True)
    assert cfg.code_dim == 2 and SMALL.code_dim == 4
    tok = ImageTokenizer.create(cfg, seed=2, batch_size=4)
    p = tok.params
    assert p["codebook"].shape == (32, 2)
    assert p["quant_proj"]["kernel"].shape == (4, 2)
    assert p["post_quant_proj"]["kernel"].shape == (2, 4)
    assert p["quant_conv"]["kernel"].shape[-1] == 4  # embed_dim is kept around the lookup
    model = nnx.merge(graphdef(cfg), p)
    x = to_float(jnp.asarray(_blocks(3, seed=1)))
    z = model.embed(x)
    assert z.shape == (3, 8, 8, 2)
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(model.codes_table(), axis=-1), 1.0, rtol=1e-5)
    # nearest by distance between unit vectors = highest cosine with the raw codes
    book = np.asarray(p["codebook"])
    cos = np.einsum("bhwd,kd->bhwk", np.asarray(z), book / np.linalg.norm(book, axis=1)[:, None])
    np.testing.assert_array_equal(model.encode(x), cos.argmax(-1))

    images = _blocks(5, seed=3)
    codes = tok.encode(images)
    assert codes.shape == (5, 64) and codes.max() < 32
    decoded = tok.decode(codes)
    assert decoded.shape == (5, 8, 8, 3)
    tok.save(tmp_path / "t")
    saved = json.loads((tmp_path / "t" / "vqgan.json").read_text())
    assert saved["codebook_dim"] == 2 and saved["codebook_l2_norm"] is True
    back = ImageTokenizer.load(tmp_path / "t", batch_size=4)
    assert back.config == cfg
    np.testing.assert_array_equal(back.encode(images), codes)
    np.testing.assert_array_equal(back.decode(codes), decoded)


def test_vqgan_json_without_the_new_keys_loads_with_defaults(tmp_path):
    tok = ImageTokenizer(SMALL, init_params(SMALL, 1))
    tok.save(tmp_path / "old")
    path = tmp_path / "old" / "vqgan.json"
    raw = json.loads(path.read_text())
    for key in ("codebook_l2_norm", "codebook_dim"):
        del raw[key]
    path.write_text(json.dumps(raw))  # as a tokenizer saved before the keys existed
    back = ImageTokenizer.load(tmp_path / "old")
    assert back.config == SMALL and not back.config.codebook_l2_norm
    assert back.config.codebook_dim is None
    assert "quant_proj" not in back.params
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(tok.params)):
        np.testing.assert_array_equal(a, b)
    # the default model has exactly the parameters it had before the options
    names = set(abstract_params(lambda rngs: VQGAN(SMALL, rngs=rngs)))
    assert names == {"encoder", "quant_conv", "codebook", "post_quant_conv", "decoder"}


def test_option_keys_are_checked():
    for override, msg in [("vqgan.codebook_dim=0", "vqgan.codebook_dim=0 must be > 0"),
                          ("vqgan.codebook_l2_norm=1", "vqgan.codebook_l2_norm=1: expected true"),
                          ("vqgan_train.disc_loss=vanilla", "vqgan_train.disc_loss='vanilla' is "
                                                            "not one of"),
                          ("vqgan_train.lecam_weight=-1", "vqgan_train.lecam_weight=-1.0 must be "
                                                          ">= 0"),
                          ("vqgan_train.adaptive_weight=2", "adaptive_weight=2: expected true or false"),
                          ("vqgan_train.disc_weight=0 vqgan_train.adaptive_weight=true",
                           "vqgan_train.adaptive_weight=True shapes the GAN, which is off")]:
        with pytest.raises(ConfigError, match=msg):
            load_config("configs/tiny.yaml", override.split())
    for override, msg in [("vqgan_train.perceptual_weight=1", "needs the published LPIPS weights"),
                          ("vqgan_train.perceptual_weight=1 vqgan_train.lpips_vgg=v.pth",
                           "needs the published LPIPS weights"),
                          ("vqgan_train.lpips_heads=h.pth", "perceptual_weight=0 does not use "
                                                            "them"),
                          ("vqgan_train.perceptual_weight=-1", "perceptual_weight=-1.0 must be "
                                                               ">= 0"),
                          ("vqgan_train.schedule=linear", "vqgan_train.schedule='linear' is not "
                                                          "one of")]:
        with pytest.raises(ConfigError, match=msg):
            load_config("configs/tiny.yaml", override.split())
    cfg = load_config("configs/tiny.yaml", ["vqgan.codebook_dim=8", "vqgan_train.disc_weight=0.1",
                                             "vqgan_train.lecam_weight=0.001"])
    assert cfg.vqgan.code_dim == 8 and cfg.vqgan_train.lecam_weight == 0.001


@pytest.mark.slow
def test_l2_normalised_codes_raise_codebook_usage(tmp_path):
    """Same seed, data and 20 steps, no dead-code restarts: the cosine lookup uses more codes."""
    t = VQGANTrainConfig(steps=20, restart_every=0, log_every=10, seed=0, lr=2e-3, b1=0.9,
                         b2=0.99, recon_loss="l2", batch_size=8)
    images, held_out = _blocks(64, seed=0), _blocks(16, seed=1)
    runs = {}
    for name, cfg in [("plain", SMALL), ("l2", dataclasses.replace(SMALL, codebook_l2_norm=True)),
                      ("l2 again", dataclasses.replace(SMALL, codebook_l2_norm=True))]:
        tok, s = train_image_tokenizer(cfg, t, images, tmp_path / name, held_out, progress=False)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = tok, s, rows
    (_, plain, plain_rows), (tok, l2, l2_rows), (tok2, again, _) = runs.values()
    print(f"usage plain {plain['codebook_usage']:.3f} (perplexity "
          f"{plain['codebook_perplexity']:.2f}), l2 {l2['codebook_usage']:.3f} (perplexity "
          f"{l2['codebook_perplexity']:.2f})")
    assert l2["codebook_usage"] > plain["codebook_usage"]
    assert l2["codebook_perplexity"] > plain["codebook_perplexity"]
    assert l2_rows[-1]["usage"] > plain_rows[-1]["usage"]
    for rows in (plain_rows, l2_rows):  # every row has both, within their ranges
        assert [r["step"] for r in rows] == [10, 20]
        assert all(0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= 32 for r in rows)
    # deterministic: the same run twice gives the same codebook and numbers
    np.testing.assert_array_equal(tok2.params["codebook"], tok.params["codebook"])
    assert {k: v for k, v in again.items() if k != "train_seconds"} == \
        {k: v for k, v in l2.items() if k != "train_seconds"}


@pytest.mark.slow
def test_gan_options_train_and_log(tmp_path):
    """non_saturating + adaptive weight + LeCam on a low-dim l2 lookup: the step runs, logs."""
    cfg = dataclasses.replace(SMALL, codebook_dim=2, codebook_l2_norm=True)
    t = VQGANTrainConfig(steps=3, disc_weight=0.5, disc_loss="non_saturating",
                         adaptive_weight=True, lecam_weight=0.1, disc_channels=8, disc_layers=1,
                         log_every=1, restart_every=2, eval_images=8, batch_size=4, lr=2e-3)
    _, s = train_image_tokenizer(cfg, t, _blocks(16, seed=0), tmp_path, _blocks(8, seed=1),
                                 progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert {"d_weight", "lecam", "disc", "gen", "usage", "perplexity"} <= set(r)
        assert np.isfinite(r["loss"]) and 0 < r["d_weight"] <= 0.5e4 and r["perplexity"] >= 1
    assert rows[0]["lecam"] > 0
    assert np.isfinite(s["psnr"]) and s["codebook_perplexity"] >= 1


def _lpips_files(tmp_path, seed=3):
    """A random-weight LPIPS (the real shapes) saved as the two files the trainer reads."""
    net = lpips_lib.random_init(seed)
    vgg, heads = tmp_path / "vgg16.npz", tmp_path / "lpips_vgg_heads.npz"
    lpips_lib.save_npz(net, vgg, heads)
    return net, str(vgg), str(heads)


@pytest.mark.slow
def test_perceptual_term_is_lpips_and_enters_the_adaptive_weight(tmp_path):
    """rec = L1 + 0.7 x mean LPIPS(recon, x), and taming's ratio takes its gradient too."""
    cfg = dataclasses.replace(SMALL, resolution=16)
    net, vgg, heads = _lpips_files(tmp_path)
    t = VQGANTrainConfig(perceptual_weight=0.7, lpips_vgg=vgg, lpips_heads=heads,
                         disc_weight=0.5, adaptive_weight=True, disc_channels=8, disc_layers=1,
                         recon_loss="l1")
    params = init_params(cfg, 0)
    dparams = init_like(abstract_params(lambda rngs: PatchGAN(8, 1, rngs=rngs)), 1)
    dgdef = nnx.graphdef(nnx.eval_shape(lambda: PatchGAN(8, 1, rngs=nnx.Rngs(0))))
    x = to_float(jnp.asarray(_blocks(4, seed=0, r=16, block=4)))

    def recon(p):
        return nnx.merge(graphdef(cfg), p)(x)[0]

    def rec(p):
        return jnp.mean(jnp.abs(recon(p) - x)) + 0.7 * jnp.mean(net(recon(p), x))

    def gan(p):
        return -jnp.mean(nnx.merge(dgdef, dparams)(recon(p)))

    @jax.jit
    def hand_and_trainer(p, dp, lp):
        last = [jax.grad(f)(p)["decoder"]["conv_out"]["kernel"] for f in (rec, gan)]
        norms = [jnp.sqrt(jnp.sum(g ** 2)) for g in last]
        loss, (metrics, *_) = loss_functions(cfg, t, gan=True)[0](p, dp, x, lp)
        return norms, jnp.mean(net(recon(p), x)), rec(p), gan(p), loss, metrics

    (rec_norm, gan_norm), perceptual, rec_value, gan_value, loss, m = hand_and_trainer(
        params, dparams, net.params)
    assert float(perceptual) > 0.01  # the term is there to see
    np.testing.assert_allclose(m["perceptual"], perceptual, rtol=1e-5)
    np.testing.assert_allclose(m["rec"], rec_value, rtol=1e-5)
    np.testing.assert_allclose(m["pixel"], rec_value - 0.7 * perceptual, rtol=1e-5)
    want = 0.5 * np.clip(float(rec_norm) / (float(gan_norm) + 1e-4), 0, 1e4)
    np.testing.assert_allclose(m["d_weight"], want, rtol=1e-4)
    np.testing.assert_allclose(
        loss, rec_value + m["codebook"] + t.beta * m["commit"] + want * gan_value, rtol=1e-5)


@pytest.mark.slow
def test_trainer_with_lpips_weights_logs_the_terms_and_names_missing_files(tmp_path):
    cfg = dataclasses.replace(SMALL, resolution=16)
    _, vgg, heads = _lpips_files(tmp_path)
    t = VQGANTrainConfig(steps=2, perceptual_weight=1.0, lpips_vgg=vgg, lpips_heads=heads,
                         log_every=1, eval_images=4, batch_size=4, lr=2e-3)
    images = _blocks(8, seed=0, r=16, block=4)
    train_image_tokenizer(cfg, t, images, tmp_path / "run", images[:4], progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["perceptual"] > 0
        np.testing.assert_allclose(r["rec"], r["pixel"] + r["perceptual"], rtol=1e-5)
    missing = dataclasses.replace(t, lpips_heads=str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="vqgan_train.lpips_heads=.*absent.pth: no such"):
        train_image_tokenizer(cfg, missing, images, tmp_path / "x", images[:4], progress=False)
    assert not (tmp_path / "x").exists()  # refused before any work
    with pytest.raises(ValueError, match="LPIPS needs images of at least 16x16"):
        train_image_tokenizer(SMALL, t, _blocks(8, seed=0), tmp_path / "y", _blocks(4, seed=1),
                              progress=False)


def test_cosine_schedule_decays_from_lr_to_zero_and_is_logged(tmp_path):
    t = VQGANTrainConfig(lr=2e-3, steps=4, schedule="cosine", log_every=1, batch_size=4,
                         eval_images=4, restart_every=0)
    lr = learning_rate(t)
    want = [2e-3 * (1 + np.cos(np.pi * k / 4)) / 2 for k in range(5)]  # 2e-3 ... 0
    np.testing.assert_allclose([float(lr(k)) for k in range(5)], want, rtol=1e-6, atol=1e-12)
    assert learning_rate(dataclasses.replace(t, schedule="constant")) == 2e-3
    train_image_tokenizer(SMALL, t, _blocks(8, seed=0), tmp_path, _blocks(4, seed=1),
                          progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["lr"] for r in rows], want[:4], rtol=1e-6)
