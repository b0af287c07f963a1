"""`cm3leon generate image|caption|infill` against a run directory.

The model comes from the run (config.yaml + latest checkpoint); the text and image
tokenizers from the prepared data directory it was trained on (`data.dir`, which an
override may point elsewhere as long as its vocabulary is the run's).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cm3leon_jax.config import ConfigError
from cm3leon_jax.generate import tasks
from cm3leon_jax.generate.run import load_run


def open_tokenizers(cfg, vocab):
    """The run's prepared data directory, checked against the model's vocabulary."""
    from cm3leon_jax.data.prepare import open_prepared

    if cfg.data.dir is None:
        raise ConfigError("data.dir is not set: generation needs the prepared data directory "
                          "(its text and image tokenizers); pass data.dir=DIR")
    prepared = open_prepared(cfg.data.dir)
    if prepared.vocab != vocab:
        raise ConfigError(f"{cfg.data.dir}/vocab.json {prepared.vocab} differs from the run's "
                          f"vocabulary {vocab}")
    return prepared


def image_grid(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 picture, `columns` images a row, white gaps."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h,
             gap + c * (w + gap):gap + c * (w + gap) + w] = im
    return grid


def generate_image(workdir, prompts: list[str], num: int, out: str | None,
                   overrides: list[str]) -> Path:
    """Write a PNG grid (a row per prompt: `num` images x generate.candidates) and the codes
    (.npy) next to it; returns the PNG path."""
    from PIL import Image

    cfg, model, step = load_run(workdir, overrides)
    prepared = open_tokenizers(cfg, model.vocab)
    image_tok = prepared.image_tokenizer()
    n_tokens = cfg.generate.image_tokens or image_tok.tokens_per_image
    if n_tokens != image_tok.tokens_per_image:
        raise ConfigError(f"generate.image_tokens={n_tokens} but the image tokenizer makes "
                          f"{image_tok.tokens_per_image} tokens per image")
    captions = [model.vocab.text_ids(prepared.text.encode(p)) for p in prompts]
    repeated = [c for c in captions for _ in range(num)]  # samples differ by their keys
    codes = tasks.text_to_image(model, repeated, n_tokens, cfg.generate)
    codes = codes.reshape(len(prompts), num, cfg.generate.candidates, n_tokens)
    pixels = image_tok.decode(codes.reshape(-1, n_tokens))
    path = Path(out) if out else Path(workdir) / "samples" / f"generate-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(pixels, num * cfg.generate.candidates)).save(path)
    np.save(path.with_suffix(".npy"), codes)
    g = cfg.generate
    print(f"{len(prompts)} prompt(s) x {num} image(s) x {g.candidates} candidate(s) from "
          f"checkpoint {step} (cfg {g.cfg_scale}, pool {g.pool}, temperature "
          f"{g.temperature}, top-p {g.top_p}) -> {path}")
    if g.candidates > 1:
        print("candidates are not reranked: no image-text scorer is wired to the CLI yet")
    return path


def caption_images(workdir, images: list[str], overrides: list[str]) -> list[str]:
    from PIL import Image

    from cm3leon_jax.data.prepare import fit_image
    from cm3leon_jax.data.sources import to_rgb

    cfg, model, _ = load_run(workdir, overrides)
    prepared = open_tokenizers(cfg, model.vocab)
    image_tok = prepared.image_tokenizer()
    pixels = []
    for f in images:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--image {f} does not exist")
        pixels.append(fit_image(to_rgb(np.asarray(Image.open(f)), f), image_tok.resolution))
    codes = image_tok.encode(np.stack(pixels))
    ids = tasks.image_to_text(model, list(codes), cfg.generate)
    texts = [prepared.text.decode(model.vocab.to_piece_ids(i)) for i in ids]
    for f, t in zip(images, texts):
        print(f"{f}\t{t}")
    return texts


def infill_text(workdir, before: str, after: str, overrides: list[str]) -> str:
    cfg, model, _ = load_run(workdir, overrides)
    prepared = open_tokenizers(cfg, model.vocab)
    enc = lambda s: model.vocab.text_ids(prepared.text.encode(s)) if s else np.zeros(0, np.int32)
    (ids,) = tasks.infill(model, [(enc(before), enc(after))], cfg.generate)
    text = prepared.text.decode(model.vocab.to_piece_ids(ids))
    print(f"{before}[{text}]{after}")
    return text
