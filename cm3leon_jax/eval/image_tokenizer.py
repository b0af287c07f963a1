"""`cm3leon tokenizer eval-image`: how well an image tokenizer reconstructs held-out images.

Images of the config's source that the tokenizer did not train on go through encode and
decode, a batch at a time, and the pairs (original, reconstruction) are measured:

- PSNR (dB) of the mean squared error over every pixel of the set (uint8 scale);
- SSIM, Wang et al. 2004: Gaussian window sigma 1.5 (11x11), K1 = 0.01, K2 = 0.03, L = 255,
  the map averaged over the valid window positions, per channel, then over channels and
  images (what scikit-image's `structural_similarity(gaussian_weights=True,
  use_sample_covariance=False, data_range=255)` computes; scikit-image is not a dependency,
  so the filter is scipy's);
- codebook usage (distinct codes / codebook size) and perplexity (exp of the entropy of the
  code histogram over every token of the set);
- rFID: the Fréchet distance (eval/fid.py) of Inception features of originals and
  reconstructions; with the FID Inception weights it is the standard rFID, without them the
  network has random weights and the key says so (`rfid_random_inception`): comparable
  only between tokenizers measured the same way;
- LPIPS (perception/lpips.py, VGG16 + lpips' v0.1 heads) when both weight files are given;
- on `shapes` the demo's detector (shapes/detector.py `image_matches` with the scene's
  caption) on the originals and on their reconstructions: `detector_on_truth` and
  `detector_on_reconstructions` as the demo's report.json defines them.

Held out (`held_out`): for `shapes`, scenes `source.size` onwards of `source.seed` —
`prepare` trains on scenes below `source.size`, and the demo evaluates on these; a tokenizer
from `cm3leon tokenizer train-image` trained on scenes 0..vqgan_train.images-1 of
`vqgan_train.seed` instead, so evaluate it with another `source.seed`. For `fashion_mnist`
the test split. Other sources are read as configured (their first readable records):
point `source.*` at a split or files the tokenizer did not see. The tokenizer, the weight
files, the source and `--out` may be on cloud storage (storage.py).
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.config.data import SourceConfig
from cm3leon_jax.data.sources import (
    FASHION_MNIST_DIR,
    BadRecord,
    FashionMnistSource,
    ShapesSource,
    fit_image,
    open_source,
)
from cm3leon_jax.eval import fid as fid_lib
from cm3leon_jax.perception import inception as inception_lib
from cm3leon_jax.perception import lpips as lpips_lib
from cm3leon_jax.shapes import detector
from cm3leon_jax.tokenizers.image import ImageTokenizer

SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5  # scipy's radius int(3.5 * 1.5 + 0.5) = 5: 11x11
SSIM_RADIUS = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0  # uint8 pixels: PSNR's peak and SSIM's dynamic range L
RANDOM_INCEPTION_SEED = 0


# ----------------------------------------------------------------------------- metrics


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error on the 0..255 scale (inf for a perfect copy)."""
    return float("inf") if mse == 0 else float(10 * np.log10(PEAK ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM float64 [N] of two uint8 [N, H, W, C] sets (H, W >= 11), the channel
    mean of each channel's SSIM map averaged over the valid 11x11 window positions."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or min(a.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs two image sets [N, H >= 11, W >= 11, C] of one shape, "
                         f"got {a.shape} and {b.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)

    def blur(z):
        return ndimage.gaussian_filter(z, (0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = SSIM_RADIUS  # the filter saw padding within r of an edge: those windows are not valid
    return s[:, r:-r, r:-r, :].mean(axis=(1, 2, 3))


def code_usage(counts: np.ndarray) -> dict:
    """Usage (distinct codes / codebook size) and perplexity of a code histogram [K]."""
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float((counts > 0).mean()),
            "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "distinct_codes": int((counts > 0).sum())}


# ---------------------------------------------------------------------------- held out


class HeldOut(NamedTuple):
    source: object  # a sources.py sequence of Pair
    start: int  # the first held-out index; records start.. are read until enough
    description: str


def held_out(s: SourceConfig, resolution: int, count: int) -> HeldOut:
    """The records of `s` a tokenizer trained by `prepare` on `s` did not see (module doc)."""
    if s.kind == "shapes":
        src = ShapesSource(s.size + count, s.resolution or resolution, s.seed, s.max_objects)
        return HeldOut(src, s.size, f"shapes scenes {s.size}..{s.size + count - 1} of seed "
                       f"{s.seed} (prepare trains on scenes below source.size={s.size})")
    if s.kind == "fashion_mnist":
        return HeldOut(FashionMnistSource(s.path or FASHION_MNIST_DIR, "test"), 0,
                       "Fashion-MNIST test split")
    return HeldOut(open_source(s, resolution), 0,
                   f"source.kind={s.kind} as configured (held out only if the tokenizer did "
                   f"not train on these records)")



def _batches(h: HeldOut, resolution: int, count: int, batch: int, skipped: dict):
    """(uint8 images [B, R, R, 3], captions) of the first `count` readable held-out records,
    `batch` at a time; unreadable ones are counted in `skipped` by reason."""
    images, captions, read = [], [], 0
    for i in range(h.start, len(h.source)):
        if read == count:
            break
        try:
            pair = h.source[i]
        except BadRecord as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        images.append(fit_image(pair.image, resolution))
        captions.append(pair.caption)
        read += 1
        if len(images) == batch:
            yield np.stack(images), captions
            images, captions = [], []
    if images:
        yield np.stack(images), captions


def _padded(x: np.ndarray, batch: int) -> np.ndarray:
    """`x` with zero rows up to `batch`, so the last batch runs the compiled shape too."""
    return np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), x.dtype)])


def _features(net: inception_lib.Inception, images: np.ndarray, batch: int,
              dims: int) -> np.ndarray:
    """Inception features [B, dims] of B <= batch images."""
    x = _padded(inception_lib.resize_for_inception(images), batch)
    return inception_lib.pool_features(net, x, batch, dims)[:len(images)]


def evaluate(tok: ImageTokenizer, h: HeldOut, count: int,
             inception: inception_lib.Inception | None = None, fid_dims: int = 2048,
             lpips: lpips_lib.LPIPS | None = None, progress: bool = True) -> dict:
    """The module's metrics of `tok` on `count` held-out records of `h`.

    `inception`: the FID Inception (None: random weights, reported as
    `rfid_random_inception`); `lpips`: None leaves LPIPS unmeasured (null).
    """
    started = time.perf_counter()
    real = inception is not None
    net = inception if real else inception_lib.random_init(RANDOM_INCEPTION_SEED)
    shapes = isinstance(h.source, ShapesSource)
    counts = np.zeros(tok.codebook_size, np.int64)
    n, squared, ssims, lp, feats, hits = 0, 0.0, [], [], ([], []), ([], [])
    skipped: dict = {}
    bar = tqdm(total=count, desc="eval-image", unit="image", disable=not progress)
    for images, captions in _batches(h, tok.resolution, count, tok.batch_size, skipped):
        codes = tok.encode(images)
        recon = tok.decode(codes)
        counts += np.bincount(codes.ravel(), minlength=tok.codebook_size)
        squared += float(np.sum((images.astype(np.float64) - recon) ** 2))
        n += len(images)
        ssims.append(ssim(images, recon))
        for side, x in enumerate((images, recon)):
            feats[side].append(_features(net, x, tok.batch_size, fid_dims))
            if shapes:
                hits[side].extend(detector.image_matches(im, c) for im, c in zip(x, captions))
        if lpips is not None:
            b = tok.batch_size
            lp.append(np.asarray(lpips(_padded(images, b), _padded(recon, b)))[:len(images)])
        bar.update(len(images))
    bar.close()
    if n < 2:
        raise ConfigError(f"{h.description}: {n} readable held-out image(s); rFID needs at "
                          f"least 2 (skipped: {skipped or 'none'})")
    fd = fid_lib.frechet_distance(*fid_lib.statistics(np.concatenate(feats[0])),
                                  *fid_lib.statistics(np.concatenate(feats[1])))
    features = (f"FID Inception {inception.source}" if real else
                f"random-init Inception (seed {RANDOM_INCEPTION_SEED}): not the FID network; "
                f"comparable only between tokenizers measured this way")
    result = {
        "held_out": h.description, "images": n, "skipped": skipped,
        "resolution": tok.resolution, "tokens_per_image": tok.tokens_per_image,
        "codebook_size": tok.codebook_size,
        "psnr": psnr(squared / (n * tok.resolution ** 2 * 3)),
        "ssim": float(np.concatenate(ssims).mean()),
        **code_usage(counts),
        "rfid" if real else "rfid_random_inception": fd,
        "fid_features": features, "fid_dims": fid_dims,
        "lpips": float(np.concatenate(lp).mean()) if lpips is not None else None,
        "lpips_weights": lpips.source if lpips is not None else None,
    }
    if shapes:
        result["detector_on_truth"] = float(np.mean(hits[0]))
        result["detector_on_reconstructions"] = float(np.mean(hits[1]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summary_line(result: dict) -> str:
    """One line of the numbers, each named as the JSON names it."""
    fid_key = "rfid" if "rfid" in result else "rfid_random_inception"
    parts = [f"PSNR {result['psnr']:.2f} dB", f"SSIM {result['ssim']:.4f}",
             f"codebook usage {result['codebook_usage']:.1%} (perplexity "
             f"{result['codebook_perplexity']:.1f})",
             f"{fid_key} {result[fid_key]:.3f} ({result['fid_dims']}-d)",
             "LPIPS not measured (--lpips-vgg, --lpips-heads)" if result["lpips"] is None
             else f"LPIPS {result['lpips']:.4f}"]
    if "detector_on_reconstructions" in result:
        parts.append(f"detector on reconstructions {result['detector_on_reconstructions']:.3f}"
                     f" (on the originals {result['detector_on_truth']:.3f})")
    return f"{result['images']} held-out images, {result['held_out']}: " + ", ".join(parts)


def run(cfg: Config, tokenizer: str, count: int | None = None,
        inception_weights: str | None = None, fid_dims: int = 2048,
        lpips_vgg: str | None = None, lpips_heads: str | None = None,
        batch_size: int = 32, out: str | None = None, progress: bool = True) -> dict:
    """`cm3leon tokenizer eval-image`: load, measure on `count` (default
    `vqgan_train.eval_images`) held-out images of `cfg.source`, write `out` as JSON."""
    if not ImageTokenizer.saved(tokenizer):
        raise ConfigError(f"--tokenizer {tokenizer}: not a saved image tokenizer (no "
                          f"vqgan.json + vqgan.npz there)")
    count = cfg.vqgan_train.eval_images if count is None else count
    if count < 2:
        raise ConfigError(f"--num {count}: rFID needs at least 2 images")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if (lpips_vgg is None) != (lpips_heads is None):
        raise ConfigError("--lpips-vgg and --lpips-heads: LPIPS needs both the VGG16 trunk "
                          "and the lpips heads")
    for flag, path in (("--inception-weights", inception_weights), ("--lpips-vgg", lpips_vgg),
                       ("--lpips-heads", lpips_heads)):
        if path is not None and not storage.path(path).is_file():
            raise ConfigError(f"{flag} {path} does not exist")
    if out is not None and not storage.is_remote(out) and not storage.path(out).parent.is_dir():
        raise ConfigError(f"--out {out}: its folder does not exist")
    tok = ImageTokenizer.load(tokenizer, batch_size=batch_size)
    net = inception_lib.load_inception(inception_weights) if inception_weights else None
    lp = lpips_lib.load_lpips(lpips_vgg, lpips_heads) if lpips_vgg is not None else None
    result = {"tokenizer": str(tokenizer),
              **evaluate(tok, held_out(cfg.source, tok.resolution, count), count, net,
                         fid_dims, lp, progress)}
    if out is not None:
        storage.write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    return result
