"""`cm3leon tokenizer eval-image` (eval/image_tokenizer.py): its metrics against independent
computations written here, and the command end to end on a random tokenizer."""

import functools
import json

import numpy as np
import pytest

from cm3leon_jax.config import load_config
from cm3leon_jax.eval import image_tokenizer as it
from cm3leon_jax.tokenizers.image import ImageTokenizer
from conftest import CONFIGS, run_cli

VQ = ["vqgan.resolution=24", "vqgan.base_channels=8", "vqgan.channel_mult=[1, 2]",
      "vqgan.num_res_blocks=1", "vqgan.mid_attn=false", "vqgan.norm_groups=4",
      "vqgan.z_channels=8", "vqgan.embed_dim=4", "vqgan.codebook_size=32", "vocab.image_size=32"]
SOURCE = ["source.kind=shapes", "source.size=10", "source.seed=3"]


def _ssim_by_windows(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written out: every valid 11x11 window, Gaussian weights sigma 1.5,
    weighted (population) moments, K1 = 0.01, K2 = 0.03, L = 255; mean over windows,
    channels and images."""
    g = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        for c in range(x.shape[-1]):
            for i in range(x.shape[0] - 10):
                for j in range(x.shape[1] - 10):
                    p, q = x[i:i + 11, j:j + 11, c], y[i:i + 11, j:j + 11, c]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    values.append((2 * mp * mq + c1) * (2 * cov + c2)
                                  / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_against_direct_computations():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 17, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert it.psnr(0.0) == float("inf")
    np.testing.assert_allclose(it.ssim(a, a), 1.0, rtol=0, atol=1e-12)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert it.psnr(mse) == pytest.approx(20 * np.log10(255) - 10 * np.log10(mse), abs=1e-12)
    assert it.ssim(a, b).mean() == pytest.approx(_ssim_by_windows(a, b), abs=1e-10)
    assert 0 < it.ssim(a, b).mean() < 1
    with pytest.raises(ValueError, match="11"):
        it.ssim(a[:, :10], b[:, :10])


def test_usage_and_perplexity_of_a_hand_made_histogram():
    codes = np.array([[0, 0, 1], [3, 0, 1], [0, 1, 3]])  # counts 4, 3, 0, 2 of 8 codes
    u = it.code_usage(np.bincount(codes.ravel(), minlength=8))
    p = np.array([4, 3, 2]) / 9
    assert u == {"codebook_usage": 3 / 8, "distinct_codes": 3,
                 "codebook_perplexity": pytest.approx(np.exp(-(p * np.log(p)).sum()))}
    assert it.code_usage(np.array([5, 0, 0]))["codebook_perplexity"] == pytest.approx(1.0)


def test_held_out_records():
    cfg = load_config(None, SOURCE)
    h = it.held_out(cfg.source, 24, 4)
    assert (h.start, len(h.source), h.source.seed) == (10, 14, 3)
    assert "scenes 10..13 of seed 3" in h.description
    fm = load_config(None, ["source.kind=fashion_mnist"]).source
    assert it.held_out(fm, 32, 4).source.split == "test"


@pytest.fixture(scope="module")
def random_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "tok"
    ImageTokenizer.create(load_config(CONFIGS / "tiny.yaml", VQ).vqgan, seed=0).save(path)
    return path


def test_eval_image_end_to_end(random_tokenizer, tmp_path, capsys, monkeypatch):
    from cm3leon_jax.data.sources import ShapesSource
    from cm3leon_jax.perception import inception, lpips
    from cm3leon_jax.shapes import detector

    # one random Inception for the command and the check below (drawing it takes seconds)
    monkeypatch.setattr(inception, "random_init", functools.lru_cache(inception.random_init))
    vgg, heads = tmp_path / "vgg.npz", tmp_path / "heads.npz"
    lpips.save_npz(lpips.random_init(1), vgg, heads)
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(
        capsys, "tokenizer", "eval-image", "--config", str(CONFIGS / "tiny.yaml"),
        "--tokenizer", str(random_tokenizer), "--source", "shapes", "--num", "6",
        "--batch-size", "4", "--fid-dims", "64", "--lpips-vgg", str(vgg), "--lpips-heads",
        str(heads), "--out", str(out), *SOURCE[1:])
    assert code == 0, err
    assert len(stdout.strip().splitlines()) == 1 and stdout.strip().endswith(str(out))
    r = json.loads(out.read_text())
    assert "rfid" not in r and r["rfid_random_inception"] >= 0
    assert "random-init Inception" in r["fid_features"]
    assert (r["images"], r["skipped"], r["resolution"]) == (6, {}, 24)

    # the same numbers, computed here from the same images and reconstructions
    tok = ImageTokenizer.load(random_tokenizer)
    scenes = [ShapesSource(16, 24, 3, 3)[i] for i in range(10, 16)]
    images = np.stack([p.image for p in scenes])
    codes = tok.encode(images)
    recon = tok.decode(codes)
    mse = np.mean((images.astype(np.float64) - recon) ** 2)
    assert r["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-9)
    assert r["ssim"] == pytest.approx(it.ssim(images, recon).mean(), rel=1e-9)
    assert r["codebook_usage"] == len(np.unique(codes)) / 32
    assert r["distinct_codes"] == len(np.unique(codes))
    on_recon = np.mean([detector.image_matches(x, p.caption) for x, p in zip(recon, scenes)])
    assert 0 <= r["detector_on_reconstructions"] <= 1
    assert r["detector_on_reconstructions"] == on_recon
    assert r["detector_on_truth"] == np.mean([detector.image_matches(p.image, p.caption)
                                              for p in scenes])
    model = lpips.load_lpips(vgg, heads)
    assert r["lpips"] == pytest.approx(float(np.mean(model(images, recon))), rel=1e-5)

    # the FID network given explicitly: the same distance, now under the rFID name
    h = it.held_out(load_config(None, SOURCE).source, 24, 6)
    again = it.evaluate(ImageTokenizer.load(random_tokenizer, 4), h, 6,
                        inception.random_init(it.RANDOM_INCEPTION_SEED), 64, progress=False)
    assert "rfid_random_inception" not in again
    assert again["rfid"] == pytest.approx(r["rfid_random_inception"], rel=1e-6)
    assert again["lpips"] is None


def test_eval_image_bad_inputs_are_one_line(random_tokenizer, tmp_path, capsys):
    base = ["tokenizer", "eval-image", "--config", str(CONFIGS / "tiny.yaml")]
    cases = {
        "--tokenizer": ([*base, "--tokenizer", str(tmp_path / "none")], "--tokenizer"),
        "--num": ([*base, "--tokenizer", str(random_tokenizer), "--num", "1"], "--num 1"),
        "lpips pair": ([*base, "--tokenizer", str(random_tokenizer), "--lpips-vgg",
                        str(tmp_path / "v.npz")], "--lpips-heads"),
        "weights": ([*base, "--tokenizer", str(random_tokenizer), "--inception-weights",
                     str(tmp_path / "inc.pth")], "--inception-weights"),
        "out": ([*base, "--tokenizer", str(random_tokenizer), "--out",
                 str(tmp_path / "no" / "r.json")], "--out"),
        "source": ([*base, "--tokenizer", str(random_tokenizer), "--source", "pictures"],
                   "source.kind"),
    }
    for name, (argv, needle) in cases.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (name, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith("cm3leon tokenizer: ") and needle in line, (name, err)
        assert "Traceback" not in err, (name, err)
