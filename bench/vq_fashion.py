"""Two image-tokenizer recipes at one step budget on Fashion-MNIST (issue 21).

    python bench/vq_fashion.py --workdir /tmp/vqf \
        --a "vqgan_train.steps=1000 vqgan_train.batch_size=16 vqgan_train.restart_every=50 vqgan.codebook_l2_norm=false" \
        --b "vqgan_train.steps=2000"

Each recipe is `configs/demo.yaml`'s tokenizer plus its overrides (the example: the old
demo recipe against the new at the same number of images seen), trained on
`--train-images` images spread over Fashion-MNIST's train split (28x28 gray as RGB, resized
to vqgan.resolution) and measured on the first `--eval-images` of the test split: PSNR,
SSIM (the stand-in for LPIPS: no VGG16/LPIPS weights on this machine), codebook usage and
perplexity; one JSON line per recipe for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.data.sources import FashionMnistSource, fit_image  # noqa: E402
from cm3leon_jax.eval.image_tokenizer import code_usage, ssim  # noqa: E402
from cm3leon_jax.tokenizers.image_train import psnr, train_image_tokenizer  # noqa: E402


def images(split: str, indices, resolution: int) -> np.ndarray:
    src = FashionMnistSource(split=split)
    return np.stack([fit_image(src[int(i)].image, resolution) for i in indices])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--workdir", required=True)
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--a", default="", help="overrides of recipe A (space separated)")
    p.add_argument("--b", default="", help="overrides of recipe B (space separated)")
    args = p.parse_args()
    base = load_config(args.config)
    r = base.vqgan.resolution
    n = len(FashionMnistSource(split="train"))
    train = images("train", np.linspace(0, n - 1, args.train_images).round(), r)
    test = images("test", range(args.eval_images), r)
    for name, overrides in (("A", args.a), ("B", args.b)):
        cfg = load_config(args.config, overrides.split())
        tok, s = train_image_tokenizer(cfg.vqgan, cfg.vqgan_train, train,
                                       Path(args.workdir) / name, test[:64])
        codes = tok.encode(test)
        recon = tok.decode(codes)
        usage = code_usage(np.bincount(codes.ravel(), minlength=tok.codebook_size))
        t = cfg.vqgan_train
        print(json.dumps({"recipe": name, "overrides": overrides, "steps": t.steps,
                          "images_seen": t.steps * t.batch_size,
                          "test_images": len(test), "psnr": round(psnr(test, recon), 2),
                          "ssim": round(float(ssim(test, recon).mean()), 4),
                          "codebook_usage": round(usage["codebook_usage"], 3),
                          "perplexity": round(usage["codebook_perplexity"], 1),
                          "train_seconds": s["train_seconds"]}), flush=True)


if __name__ == "__main__":
    main()
