"""VQ-GAN model and ImageTokenizer: shapes, quantizer, batching, save/load round trips."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.model.vqgan import VQGAN, VQGANConfig, quantize
from cm3leon_jax.tokenizers.image import ImageTokenizer, to_float, to_uint8

TINY = VQGANConfig(resolution=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(8,), norm_groups=4, z_channels=8, embed_dim=4,
                   codebook_size=16)


def _images(n, seed=0, r=16):
    return np.random.default_rng(seed).integers(0, 256, (n, r, r, 3), dtype=np.uint8)


def test_quantize_is_the_nearest_code_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = rng.normal(size=(3, 5, 6)).astype(np.float32)
        book = rng.normal(size=(11, 6)).astype(np.float32)
        dist = ((z[..., None, :] - book) ** 2).sum(-1)
        np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(z), jnp.asarray(book))),
                                      dist.argmin(-1))


@pytest.mark.slow
def test_model_shapes_and_straight_through():
    model = VQGAN(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = to_float(jnp.asarray(_images(2)))

    @jax.jit
    def run(p):
        m = nnx.merge(graphdef, p)
        recon, codes, z, cb, commit = m(x)
        grads = [jax.grad(lambda q, i=i: nnx.merge(graphdef, q)(x)[3 + i])(p) for i in (0, 1)]
        return recon, codes, z, cb, commit, m.encode(x), m.decode(codes), grads

    recon, codes, z, cb, commit, enc, dec, (g_cb, g_commit) = run(params)
    assert recon.shape == (2, 16, 16, 3) and codes.shape == (2, 8, 8) and z.shape == (2, 8, 8, 4)
    np.testing.assert_array_equal(codes, enc)
    np.testing.assert_allclose(recon, dec, atol=1e-5)
    np.testing.assert_allclose(cb, commit, rtol=1e-6)  # same value, different gradients
    # attention blocks exist where the config asks for them (8x8 maps), in both halves
    assert len(model.encoder.down[1].attn) == 1 and len(model.encoder.down[0].attn) == 0
    assert len(model.decoder.up[0].attn) == 2 and len(model.decoder.up[1].attn) == 0
    # codebook loss moves only the codebook; commitment only the encoder side
    assert float(jnp.abs(g_cb["codebook"][...]).sum()) > 0
    assert float(jnp.abs(g_cb["encoder"]["conv_in"]["kernel"][...]).sum()) == 0
    assert float(jnp.abs(g_commit["codebook"][...]).sum()) == 0
    assert float(jnp.abs(g_commit["encoder"]["conv_in"]["kernel"][...]).sum()) > 0


def test_uint8_conversion_round_trips():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(to_uint8(to_float(jnp.asarray(x))), x)


@pytest.mark.slow
def test_tokenizer_batching_matches_one_batch_and_save_load(tmp_path):
    tok = ImageTokenizer.create(TINY, seed=1, batch_size=4)
    assert (tok.resolution, tok.tokens_per_image, tok.codebook_size) == (16, 64, 16)
    images = _images(11, seed=2)
    codes = tok.encode(images)
    assert codes.shape == (11, 64) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 16
    whole = ImageTokenizer(TINY, tok.params, batch_size=11)
    np.testing.assert_array_equal(whole.encode(images), codes)
    for i in (0, 5, 10):  # each image alone gives the same codes (padding does not leak)
        np.testing.assert_array_equal(tok.encode(images[i:i + 1])[0], codes[i])
    decoded = tok.decode(codes)
    assert decoded.shape == (11, 16, 16, 3) and decoded.dtype == np.uint8
    # another batch shape may round a pixel the other way, never more
    assert np.abs(whole.decode(codes).astype(int) - decoded).max() <= 1

    tok.save(tmp_path / "tok")
    back = ImageTokenizer.load(tmp_path / "tok", batch_size=3)
    assert back.config == TINY
    np.testing.assert_array_equal(back.encode(images), codes)
    np.testing.assert_array_equal(back.decode(codes), decoded)
    assert tok.encode(images[:0]).shape == (0, 64)


def test_tokenizer_rejects_bad_input(tmp_path):
    tok = ImageTokenizer.create(TINY, batch_size=4)
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\]"):
        tok.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tok.decode(np.full((1, 64), 16))
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        tok.decode(np.zeros((1, 63), np.int32))
    with pytest.raises(FileNotFoundError, match="vqgan.json"):
        ImageTokenizer.load(tmp_path)
    tok.save(tmp_path / "t")
    other = ImageTokenizer.create(VQGANConfig(**{**TINY.__dict__, "embed_dim": 6}))
    other.save(tmp_path / "o")
    (tmp_path / "t" / "vqgan.npz").write_bytes((tmp_path / "o" / "vqgan.npz").read_bytes())
    with pytest.raises(ValueError, match="codebook has shape"):
        ImageTokenizer.load(tmp_path / "t")


def test_vqgan_config_checks():
    for override, msg in [("vqgan.resolution=30", "not divisible by the downsampling"),
                          ("vqgan.norm_groups=7", "does not divide"),
                          ("vqgan.channel_mult=[]", "non-empty"),
                          ("vqgan.channel_mult=3", "expected a list"),
                          ("vqgan.codebook_size=0", "must be > 0"),
                          ("vqgan_train.beta=-1", "must be >= 0"),
                          ("vqgan_train.recon_loss=l3", "not one of")]:
        with pytest.raises(ConfigError, match=msg):
            load_config("configs/tiny.yaml", [override])
    cfg = load_config("configs/tiny.yaml", ["vqgan.channel_mult=[1,2,2,4]"])
    assert cfg.vqgan.channel_mult == (1, 2, 2, 4) and cfg.vqgan.downsample == 8
    paper = VQGANConfig()
    assert (paper.resolution, paper.tokens_per_image, paper.codebook_size) == (256, 1024, 8192)
