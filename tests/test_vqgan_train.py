"""VQ-GAN training: dead-code restarts, determinism, learning, outputs, CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.cli import main
from cm3leon_jax.config import VQGANConfig, VQGANTrainConfig
from cm3leon_jax.tokenizers.image import ImageTokenizer
from cm3leon_jax.tokenizers.image_train import psnr, restart_dead_codes, train_image_tokenizer

# The CLI test below runs the same model and step settings, so all share compiled programs.
TINY = VQGANConfig(resolution=24, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   norm_groups=4, z_channels=8, embed_dim=4, codebook_size=16)
STEP = dict(lr=2e-3, b1=0.9, b2=0.99, recon_loss="l2", batch_size=8)  # as configs/tiny.yaml


def _blocks(n, seed=0):
    """Two-colour images of 6x6 blocks: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    palette = np.array([[230, 230, 230], [200, 30, 30]], np.uint8)
    grid = rng.integers(0, 2, (n, 4, 4))
    return palette[grid].repeat(6, axis=1).repeat(6, axis=2)


def test_restart_replaces_exactly_the_dead_codes_with_encoder_vectors():
    rng = np.random.default_rng(0)
    book = rng.normal(size=(10, 3))
    counts = np.array([0, 5, 0, 1, 1, 0, 2, 2, 2, 9])
    z = rng.normal(size=(50, 3)) * 10
    new, n = restart_dead_codes(book, counts, z, np.random.default_rng(1))
    assert n == 3
    np.testing.assert_array_equal(new[counts > 0], book[counts > 0])
    for row in new[counts == 0]:  # each is one of the z vectors, up to the tiny noise
        assert np.abs(z - row).max(axis=1).min() < 0.1
    same, n = restart_dead_codes(book, np.ones(10), z, rng)
    assert n == 0 and same is book


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255))


@pytest.mark.slow
def test_training_learns_is_deterministic_and_saves(tmp_path):
    images, held_out = _blocks(64), _blocks(16, seed=1)
    t = VQGANTrainConfig(steps=60, restart_every=20, log_every=20, seed=3, **STEP)
    untrained = ImageTokenizer.create(TINY, seed=3)
    before = psnr(held_out, untrained.decode(untrained.encode(held_out)))
    tok, s = train_image_tokenizer(TINY, t, images, tmp_path / "a", held_out, progress=False)
    assert s["psnr"] > before + 5, (before, s)
    assert s["steps"] == 60 and s["eval_images"] == 16 and 0 < s["codebook_usage"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    png = Image.open(tmp_path / "a" / "reconstructions.png")
    assert png.size == (8 * 48, 2 * 48)  # 8 pairs, 24 px enlarged x2, originals over recons
    back = ImageTokenizer.load(tmp_path / "a" / "image_tokenizer", batch_size=8)
    np.testing.assert_array_equal(back.encode(held_out), tok.encode(held_out))
    assert psnr(held_out, back.decode(back.encode(held_out))) == s["psnr"]

    tok2, s2 = train_image_tokenizer(TINY, t, images, tmp_path / "b", held_out, progress=False)
    np.testing.assert_array_equal(tok2.params["codebook"], tok.params["codebook"])
    assert s2["psnr"] == s["psnr"]


@pytest.mark.slow
def test_gan_step_trains_the_discriminator(tmp_path):
    t = VQGANTrainConfig(steps=2, disc_weight=0.1, disc_channels=8, disc_layers=2,
                         log_every=1, eval_images=8, **STEP)
    _, s = train_image_tokenizer(TINY, t, _blocks(8), tmp_path, _blocks(8, seed=1),
                                 progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("disc" in r and "gen" in r for r in rows)
    assert np.isfinite(s["psnr"])


def test_bad_training_images_are_rejected(tmp_path):
    t = VQGANTrainConfig(steps=1, batch_size=4)
    with pytest.raises(ValueError, match=r"uint8 \[N, 24, 24, 3\]"):
        train_image_tokenizer(TINY, t, np.zeros((8, 24, 24, 3), np.float32), tmp_path, _blocks(2))
    with pytest.raises(ValueError, match="fewer than vqgan_train.batch_size=4"):
        train_image_tokenizer(TINY, t, _blocks(2), tmp_path, _blocks(2))


@pytest.mark.slow
def test_cli_train_image_on_shapes(tmp_path, capsys):
    over = ["vqgan.resolution=24", "vqgan.base_channels=8", "vqgan.channel_mult=[1,2]",
            "vqgan.num_res_blocks=1", "vqgan.norm_groups=4", "vqgan.z_channels=8",
            "vqgan.embed_dim=4", "vqgan.codebook_size=16", "vqgan_train.steps=2",
            "vqgan_train.batch_size=8", "vqgan_train.images=16", "vqgan_train.eval_images=8"]
    assert main(["tokenizer", "train-image", "--config", "configs/tiny.yaml",
                 "--workdir", str(tmp_path)] + over) == 0
    out = capsys.readouterr().out
    assert "24x24 -> 144 tokens from 16 codes" in out and "held-out PSNR" in out
    assert ImageTokenizer.load(tmp_path / "image_tokenizer").tokens_per_image == 144
    assert main(["tokenizer", "train-image", "--config", "configs/tiny.yaml", "--workdir",
                 str(tmp_path), "vqgan.resolution=25"]) == 2
