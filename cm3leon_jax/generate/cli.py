"""`cm3leon generate image|caption|infill` from a run (its latest checkpoint) or an export.

    cm3leon generate image   --workdir RUN --prompt TEXT [--num N --cfg S --out FILE.png]
                             [--samples M --rerank clip --clip DIR] [key=value ...]
    cm3leon generate caption --workdir RUN --image FILE [...] [key=value ...]
    cm3leon generate infill  --workdir RUN --before TEXT --after TEXT [key=value ...]

The weights come from train/weights.py (parameters only); the text and image tokenizers are
the ones the model trained with (`weights.tokenizer_dir`: `sft.tokenizers`, an export's
own tokenizers/, the init's, else `data.dir`; an override may point elsewhere as long as
every piece and code has an id in the model's vocabulary). Every path (the run or export,
`--out`, `--image`, `--clip`) may be on cloud storage (storage.py). Stage modules are
imported when a command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.layout import ExportDir, RunDir, is_run
from cm3leon_jax.storage import Path

HELPS = {"image": "text -> PNG grid of images", "caption": "image files -> captions",
         "infill": "fill the gap between two texts"}


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="sample images, captions or infills from a run")
    tasks = gen.add_subparsers(dest="task", required=True)
    for task, text in HELPS.items():
        p = tasks.add_parser(task, help=text)
        p.add_argument("--workdir", required=True,
                       help="run directory (its latest checkpoint) or export directory")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="e.g. generate.temperature=0.7 generate.pool=mixed data.dir=DIR")
        if task == "image":
            p.add_argument("--prompt", required=True, action="append", help="caption (repeatable)")
            p.add_argument("--num", type=int, default=4, help="images per prompt")
            p.add_argument("--cfg", type=float, help="guidance scale (generate.cfg_scale)")
            p.add_argument("--out", help="PNG path (default RUN/samples/generate-STEP.png)")
            p.add_argument("--samples", type=int,
                           help="candidates per image (generate.candidates; paper: 8)")
            p.add_argument("--rerank", choices=["clip"],
                           help="keep the best candidate by CLIP similarity (needs --clip)")
            p.add_argument("--clip", help="transformers CLIPModel directory for --rerank clip")
            p.set_defaults(fn=lambda a: generate_image(a.workdir, a.prompt, a.num, a.out,
                                                       _overrides(a), a.rerank, a.clip))
        elif task == "caption":
            p.add_argument("--image", required=True, action="append", help="image file (repeatable)")
            p.set_defaults(fn=lambda a: caption_images(a.workdir, a.image, a.overrides))
        else:
            p.add_argument("--before", required=True, help="text before the gap")
            p.add_argument("--after", default="", help="text after the gap")
            p.set_defaults(fn=lambda a: infill_text(a.workdir, a.before, a.after, a.overrides))


def _overrides(args) -> list[str]:
    cfg_scale = [] if args.cfg is None else [f"generate.cfg_scale={args.cfg}"]
    samples = [] if args.samples is None else [f"generate.candidates={args.samples}"]
    return [*args.overrides, *cfg_scale, *samples]


def generate_image(workdir, prompts: list[str], num: int, out: str | None,
                   overrides: list[str], rerank_by: str | None = None,
                   clip_dir: str | None = None) -> Path:
    """Write a PNG grid (a row per prompt: `num` images, each generate.candidates wide, or
    the best candidate alone with `rerank_by="clip"`) and the codes (.npy) next to it;
    returns the PNG path."""
    from cm3leon_jax.generate import tasks  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.generate.grid import (  # heavy: deferred (cm3leon --help)
        image_format, image_grid, save_image)
    from cm3leon_jax.generate.rerank import clip_scorer, rerank  # heavy: as above
    from cm3leon_jax.perception import clip  # heavy: deferred (cm3leon --help)

    if out is None and not is_run(workdir) and ExportDir(workdir).config.is_file():
        raise ConfigError(f"--out: {workdir} is an export, which is not written to; name the "
                          "PNG file")
    if out is not None:
        image_format(out)  # a name PIL cannot write is refused before any work
    if (rerank_by is None) != (clip_dir is None):
        raise ConfigError("--rerank clip and --clip DIR go together")
    scorer = clip.load_clip(clip_dir) if clip_dir else None  # a bad directory fails first
    cfg, model, toks, step = tasks.load_model(workdir, overrides=overrides)
    n_tokens = cfg.generate.image_tokens or toks.image.tokens_per_image
    if n_tokens != toks.image.tokens_per_image:
        raise ConfigError(f"generate.image_tokens={n_tokens} but the image tokenizer makes "
                          f"{toks.image.tokens_per_image} tokens per image")
    m = cfg.generate.candidates
    captions = [model.vocab.text_ids(toks.text.encode(p)) for p in prompts]
    repeated = [c for c in captions for _ in range(num)]  # samples differ by their keys
    codes = tasks.text_to_image(model, repeated, n_tokens, cfg.generate)
    pixels = toks.image.decode(codes.reshape(-1, n_tokens))
    columns = num * m
    if scorer is not None:
        texts = [p for p in prompts for _ in range(num)]
        groups = pixels.reshape(len(texts), m, *pixels.shape[1:])
        best, scores = rerank(list(groups), texts, clip_scorer(scorer))
        pixels = groups[np.arange(len(texts)), best[:, 0]]
        codes = codes.reshape(len(texts), m, n_tokens)[np.arange(len(texts)), best[:, 0]]
        columns = num
    path = storage.path(out) if out else RunDir(workdir).samples / f"generate-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, image_grid(pixels, columns))
    with path.with_suffix(".npy").open("wb") as f:
        np.save(f, codes.reshape(len(prompts), num, -1, n_tokens))
    g = cfg.generate
    kept = (f", best of {m} by CLIP (mean similarity {scores.max(axis=1).mean():.4f})"
            if scorer is not None else "")
    print(f"{len(prompts)} prompt(s) x {num} image(s) x {m} candidate(s) from "
          f"checkpoint {step} (cfg {g.cfg_scale}, pool {g.pool}, temperature "
          f"{g.temperature}, top-p {g.top_p}){kept} -> {path}")
    if m > 1 and scorer is None:
        print("candidates are not reranked: add --rerank clip --clip DIR to keep the best")
    return path


def caption_images(workdir, images: list[str], overrides: list[str]) -> list[str]:
    from PIL import Image  # heavy: deferred (cm3leon --help)

    from cm3leon_jax.data.sources import fit_image, to_rgb  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.generate import tasks  # heavy: deferred (cm3leon --help)

    cfg, model, toks, _ = tasks.load_model(workdir, overrides=overrides)
    pixels = []
    for f in images:
        if not storage.path(f).is_file():
            raise FileNotFoundError(f"--image {f} does not exist")
        with storage.path(f).open("rb") as stream:
            pixels.append(fit_image(to_rgb(np.asarray(Image.open(stream)), f),
                                    toks.image.resolution))
    codes = toks.image.encode(np.stack(pixels))
    ids = tasks.image_to_text(model, list(codes), cfg.generate)
    texts = [toks.text.decode(model.vocab.to_piece_ids(i)) for i in ids]
    for f, t in zip(images, texts):
        print(f"{f}\t{t}")
    return texts


def infill_text(workdir, before: str, after: str, overrides: list[str]) -> str:
    from cm3leon_jax.generate import tasks  # heavy: deferred (cm3leon --help)

    cfg, model, toks, _ = tasks.load_model(workdir, overrides=overrides)
    enc = lambda s: model.vocab.text_ids(toks.text.encode(s)) if s else np.zeros(0, np.int32)
    (ids,) = tasks.infill(model, [(enc(before), enc(after))], cfg.generate)
    text = toks.text.decode(model.vocab.to_piece_ids(ids))
    print(f"{before}[{text}]{after}")
    return text
