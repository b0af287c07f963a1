"""How long does an FID-30K evaluation's scoring take? The FID Inception, CLIP ViT-B/32 and
the 2048-d Fréchet distance, at their real sizes, on this machine.

    python bench/eval_speed.py [--images 64] [--batch-size 32] [--skip-clip]

Random weights of the real shapes (the speed does not depend on the values): the Inception
from `inception.EXPECTED`; CLIP ViT-B/32 written as a transformers `CLIPModel` directory
(needs torch and transformers, the `interop` extra) with a small byte-level tokenizer.
Prints images/s for Inception pool features (299×299, clean resize included) and for CLIP
image and text embeddings, and the seconds of one 2048×2048 `sqrtm`, then what a 30,000-image
FID-30K scoring would take at those rates (generation excluded).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cm3leon_jax.eval import fid
from cm3leon_jax.perception import clip as clip_lib
from cm3leon_jax.perception import inception as inc


def write_clip_b32(folder: Path) -> Path:
    """A random ViT-B/32 CLIPModel directory with a byte-level BPE tokenizer."""
    import transformers  # optional: the interop extra writes the model directory

    symbols = [chr(c) for c in range(33, 127)]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    cfg = transformers.CLIPConfig(text_config={"vocab_size": 49408},
                                  vision_config={"patch_size": 32}, projection_dim=512)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.CLIPImageProcessorPil().save_pretrained(folder)
    return folder


def rate(fn, n: int) -> float:
    fn()  # compile
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-clip", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 256, 256, 3), dtype=np.uint8)
    out = {}
    net = inc.random_init(0)
    out["inception_images_per_s"] = rate(lambda: inc.pool_features(
        net, inc.resize_for_inception(images), args.batch_size), args.images)
    if not args.skip_clip:
        with tempfile.TemporaryDirectory() as d:
            clip = clip_lib.load_clip(write_clip_b32(Path(d)))
        out["clip_images_per_s"] = rate(lambda: clip_lib.embed_images(
            clip, images, args.batch_size), args.images)
        texts = [f"a photo of {i} red cats on a blue sofa" for i in range(args.images)]
        out["clip_texts_per_s"] = rate(lambda: clip_lib.embed_texts(
            clip, texts, args.batch_size), args.images)
    a = rng.normal(size=(4096, 2048))
    mu, sigma = fid.statistics(a)
    t0 = time.perf_counter()
    fid.frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1)
    out["frechet_2048_s"] = time.perf_counter() - t0
    per_image = 1 / out["inception_images_per_s"]
    if "clip_images_per_s" in out:  # CLIP score + 8 candidates reranked per caption
        per_image += 9 / out["clip_images_per_s"] + 1 / out["clip_texts_per_s"]
    out["fid30k_scoring_minutes"] = (30000 * per_image + out["frechet_2048_s"]) / 60
    print(json.dumps({k: round(v, 2) for k, v in out.items()}))


if __name__ == "__main__":
    main()
