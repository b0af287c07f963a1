"""`cm3leon generate image|caption|infill` from a run (its latest checkpoint) or an export.

    cm3leon generate image   --workdir RUN --prompt TEXT [--num N --cfg S --out FILE.png]
                             [--retrieve K] [--samples M --rerank dual|clip [--clip DIR]]
                             [key=value ...]
    cm3leon generate caption --workdir RUN --image FILE [--candidates FILE] [key=value ...]
    cm3leon generate infill  --workdir RUN --before TEXT --after TEXT [key=value ...]
    (each also takes --profile DIR: a jax.profiler trace of the command)

`--retrieve K` does what the demo and `eval t2i` do: the K documents of the run's index
(`retrieval.dir`, else `<data.dir>/retrieval`) nearest the prompt by its text-only query
(retrieval/query.py), placed in front of the prompt as training places them
(`prompts.with_retrieved`). `--rerank dual` keeps the candidate the run's retrieval
encoder scores best (`rerank.dual_scorer`); `clip` a CLIPModel's. `caption --candidates`
ranks given captions (a UTF-8 text file, one caption a line, blank lines skipped) by the
model's log-likelihood of each given the image instead of sampling one.

The weights come from train/weights.py (parameters only); the text and image tokenizers are
the ones the model trained with (`weights.tokenizer_dir`: `sft.tokenizers`, an export's
own tokenizers/, the init's, else `data.dir`; an override may point elsewhere as long as
every piece and code has an id in the model's vocabulary). Every path (the run or export,
`--out`, `--image`, `--clip`, `--candidates`) may be on cloud storage (storage.py). Stage
modules are imported when a command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import json

import numpy as np

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.layout import ExportDir, RunDir, is_run, retrieval_dir
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
        p.add_argument("--profile", metavar="DIR",
                       help="write a jax.profiler trace of the command into local DIR "
                            "(tensorboard --logdir DIR, profile tab; or XProf)")
        if task == "image":
            p.add_argument("--prompt", required=True, action="append", help="caption (repeatable)")
            p.add_argument("--num", type=int, default=4, help="images per prompt")
            p.add_argument("--cfg", type=float, help="guidance scale (generate.cfg_scale)")
            p.add_argument("--out", help="PNG path (default RUN/samples/generate-STEP.png)")
            p.add_argument("--samples", type=int,
                           help="candidates per image (generate.candidates; paper: 8)")
            p.add_argument("--rerank", choices=["dual", "clip"],
                           help="keep the best candidate by the run's retrieval dual encoder "
                                "or by CLIP (needs --clip)")
            p.add_argument("--clip", help="transformers CLIPModel directory for --rerank clip")
            p.add_argument("--retrieve", type=int, metavar="K",
                           help="put the K documents of the run's retrieval index nearest "
                                "the prompt in front of it, as in training")
            p.set_defaults(fn=lambda a: generate_image(a.workdir, a.prompt, a.num, a.out,
                                                       _overrides(a), a.rerank, a.clip,
                                                       a.retrieve))
        elif task == "caption":
            p.add_argument("--image", required=True, action="append", help="image file (repeatable)")
            p.add_argument("--candidates", metavar="FILE",
                           help="rank these captions (one a line) by the model's likelihood "
                                "instead of sampling one")
            p.set_defaults(fn=lambda a: caption_images(a.workdir, a.image, a.overrides,
                                                       a.candidates))
        else:
            p.add_argument("--before", required=True, help="text before the gap")
            p.add_argument("--after", default="", help="text after the gap")
            p.set_defaults(fn=lambda a: infill_text(a.workdir, a.before, a.after, a.overrides))
        p.set_defaults(fn=_profiled(p.get_default("fn")))


def _profiled(fn):
    """`fn(args)` inside a jax.profiler trace when `--profile DIR` is given."""
    def run(args):
        if args.profile is None:
            return fn(args)
        if storage.is_remote(args.profile):
            raise ConfigError(f"--profile {args.profile}: a local directory (the profiler "
                              "writes files itself; copy the trace to a bucket after)")
        import jax  # heavy: deferred (cm3leon --help)

        with jax.profiler.trace(args.profile):
            return fn(args)

    return run


def _overrides(args) -> list[str]:
    cfg_scale = [] if args.cfg is None else [f"generate.cfg_scale={args.cfg}"]
    samples = [] if args.samples is None else [f"generate.candidates={args.samples}"]
    return [*args.overrides, *cfg_scale, *samples]


def _retrieval_checks(workdir, overrides: list[str], retrieve: int | None,
                      rerank_by: str | None) -> None:
    """--retrieve and --rerank dual against the run's retrieval directory, before any weight
    is read: the index exists and holds K documents, the encoder embeds images."""
    from cm3leon_jax.retrieval import index  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.train import weights  # heavy: deferred (cm3leon --help)

    if retrieve is not None and retrieve < 1:
        raise ConfigError(f"--retrieve {retrieve}: retrieve at least 1 document")
    if retrieve is None and rerank_by != "dual":
        return
    cfg = weights.saved_config(workdir, overrides=overrides)[0]
    rdir = retrieval_dir(cfg)
    train = ("`cm3leon retrieval train-encoder` then "
             if cfg.retrieval.encoder == "builtin" else "")
    build = (f"{train}`cm3leon index` with the run's config "
             f"({(RunDir if is_run(workdir) else ExportDir)(workdir).config}, "
             f"data.dir={cfg.data.dir})")
    if rerank_by == "dual":
        if cfg.retrieval.encoder not in ("builtin", "clip"):
            raise ConfigError(f"--rerank dual: the run's retrieval.encoder="
                              f"{cfg.retrieval.encoder} embeds no images; use --rerank clip")
        if cfg.retrieval.encoder == "builtin" and not rdir.encoder.is_dir():
            raise ConfigError(f"--rerank dual: the run has no retrieval encoder at "
                              f"{rdir.encoder}; build it with {build}")
    if retrieve is None:
        return
    manifest = rdir.index / index.MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"--retrieve {retrieve}: the run has no retrieval index at "
                          f"{rdir.index}; build it with {build}")
    size = json.loads(manifest.read_text())["size"]
    if retrieve > size:
        raise ConfigError(f"--retrieve {retrieve}: the index at {rdir.index} holds {size} "
                          "documents")


def _check_fit(conds: list[np.ndarray], n_tokens: int, max_seq_len: int, k: int) -> None:
    """Each prompt with its retrieved documents and the image it is followed by fits the
    model's context."""
    longest = max(range(len(conds)), key=lambda i: len(conds[i]))
    total = len(conds[longest]) + n_tokens
    if total > max_seq_len:
        raise ConfigError(f"--retrieve {k}: prompt {longest + 1} with its {k} retrieved "
                          f"documents is {len(conds[longest])} tokens + {n_tokens} image "
                          f"tokens = {total} > model.max_seq_len={max_seq_len}; retrieve fewer")


def generate_image(workdir, prompts: list[str], num: int, out: str | None,
                   overrides: list[str], rerank_by: str | None = None,
                   clip_dir: str | None = None, retrieve: int | None = None) -> Path:
    """Write a PNG grid (a row per prompt: `num` images, each generate.candidates wide, or
    the best candidate alone with `rerank_by` "dual" or "clip") and the codes (.npy) next
    to it; returns the PNG path. With `retrieve`, each prompt gets its K retrieved
    documents in front (the same for all its images)."""
    from cm3leon_jax.generate import prompts as layouts  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.generate import tasks  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.generate.grid import (  # heavy: deferred (cm3leon --help)
        image_format, image_grid, save_image)
    from cm3leon_jax.generate.rerank import (  # heavy: deferred (cm3leon --help)
        clip_scorer, dual_scorer, rerank)
    from cm3leon_jax.perception import clip  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.retrieval.encoders import make_encoder  # heavy: deferred (--help)
    from cm3leon_jax.retrieval.query import Retriever  # heavy: deferred (cm3leon --help)

    if out is None and not is_run(workdir) and ExportDir(workdir).config.is_file():
        raise ConfigError(f"--out: {workdir} is an export, which is not written to; name the "
                          "PNG file")
    if out is not None:
        image_format(out)  # a name PIL cannot write is refused before any work
    if (rerank_by == "clip") != (clip_dir is not None):
        raise ConfigError("--rerank clip and --clip DIR go together")
    _retrieval_checks(workdir, overrides, retrieve, rerank_by)
    clip_model = clip.load_clip(clip_dir) if clip_dir else None  # a bad directory fails first
    cfg, model, toks, step = tasks.load_model(workdir, overrides=overrides)
    n_tokens = cfg.generate.image_tokens or toks.image.tokens_per_image
    if n_tokens != toks.image.tokens_per_image:
        raise ConfigError(f"generate.image_tokens={n_tokens} but the image tokenizer makes "
                          f"{toks.image.tokens_per_image} tokens per image")
    m = cfg.generate.candidates
    captions = [model.vocab.text_ids(toks.text.encode(p)) for p in prompts]
    retriever = Retriever(cfg) if retrieve else None
    docs = retriever.documents(prompts, captions, retrieve) if retriever else None
    if docs is not None:
        _check_fit([layouts.with_retrieved(model.vocab, layouts.text_to_image(model.vocab, c)[0],
                                           d) for c, d in zip(captions, docs)],
                   n_tokens, model.max_seq_len, retrieve)
    repeated = [c for c in captions for _ in range(num)]  # samples differ by their keys
    shown = None if docs is None else [d for d in docs for _ in range(num)]
    codes = tasks.text_to_image(model, repeated, n_tokens, cfg.generate, retrieved=shown)
    pixels = toks.image.decode(codes.reshape(-1, n_tokens))
    columns = num * m
    kept = ""
    if rerank_by is not None:
        if rerank_by == "dual":
            encoder = retriever.encoder if retriever else make_encoder(
                cfg.retrieval, retrieval_dir(cfg))
            texts = [{"text": c, "caption": p, "image": []}
                     for p, c in zip(prompts, captions) for _ in range(num)]
            score = dual_scorer(encoder)
        else:
            texts = [p for p in prompts for _ in range(num)]
            score = clip_scorer(clip_model)
        groups = pixels.reshape(len(texts), m, *pixels.shape[1:])
        best, scores = rerank(list(groups), texts, score)
        pixels = groups[np.arange(len(texts)), best[:, 0]]
        codes = codes.reshape(len(texts), m, n_tokens)[np.arange(len(texts)), best[:, 0]]
        columns = num
        kept = (f", best of {m} by {'the retrieval dual encoder' if rerank_by == 'dual' else 'CLIP'}"
                f" (mean similarity {scores.max(axis=1).mean():.4f})")
    path = storage.path(out) if out else RunDir(workdir).samples / f"generate-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, image_grid(pixels, columns))
    with path.with_suffix(".npy").open("wb") as f:
        np.save(f, codes.reshape(len(prompts), num, -1, n_tokens))
    g = cfg.generate
    shown_text = f", {retrieve} retrieved document(s) each" if retrieve else ""
    print(f"{len(prompts)} prompt(s) x {num} image(s) x {m} candidate(s) from "
          f"checkpoint {step} (cfg {g.cfg_scale}, pool {g.pool}, temperature "
          f"{g.temperature}, top-p {g.top_p}{shown_text}){kept} -> {path}")
    if m > 1 and rerank_by is None:
        print("candidates are not reranked: add --rerank dual, or --rerank clip --clip DIR, "
              "to keep the best")
    return path


def read_candidates(path) -> list[str]:
    """The captions of a --candidates file: one a line, stripped, blank lines skipped."""
    f = storage.path(path)
    if not f.is_file():
        raise ConfigError(f"--candidates {path} does not exist")
    try:
        lines = [line.strip() for line in f.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise ConfigError(f"--candidates {path}: not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None
    out = [line for line in lines if line]
    if not out:
        raise ConfigError(f"--candidates {path}: no captions (one caption a line)")
    return out


def caption_images(workdir, images: list[str], overrides: list[str],
                   candidates: str | None = None) -> list[str]:
    """Print and return a caption per image: sampled (at least tasks.MIN_CAPTION_TOKENS
    pieces), or with `candidates` the file's caption the model finds most likely for it,
    followed by every candidate's log-likelihood, best first."""
    from PIL import Image  # heavy: deferred (cm3leon --help)

    from cm3leon_jax.data.sources import fit_image, to_rgb  # heavy: deferred (cm3leon --help)
    from cm3leon_jax.generate import tasks  # heavy: deferred (cm3leon --help)

    texts = read_candidates(candidates) if candidates is not None else None
    for f in images:
        if not storage.path(f).is_file():
            raise ConfigError(f"--image {f} does not exist")
    cfg, model, toks, _ = tasks.load_model(workdir, overrides=overrides)
    pixels = []
    for f in images:
        with storage.path(f).open("rb") as stream:
            pixels.append(fit_image(to_rgb(np.asarray(Image.open(stream)), f),
                                    toks.image.resolution))
    codes = toks.image.encode(np.stack(pixels))
    if texts is None:
        ids = tasks.image_to_text(model, list(codes), cfg.generate)
        out = [toks.text.decode(model.vocab.to_piece_ids(i)) for i in ids]
        for f, t in zip(images, out):
            print(f"{f}\t{t}")
        return out
    ids = [model.vocab.text_ids(toks.text.encode(t)) for t in texts]
    scores = tasks.caption_logprobs(model, [c for c in codes for _ in ids],
                                    ids * len(codes)).reshape(len(codes), len(ids))
    out = []
    for f, row in zip(images, scores):
        order = np.argsort(-row, kind="stable")
        out.append(texts[order[0]])
        print(f"{f}\t{texts[order[0]]}")
        for j in order:
            print(f"  {row[j]:.4f}\t{texts[j]}")
    return out


def infill_text(workdir, before: str, after: str, overrides: list[str]) -> str:
    from cm3leon_jax.generate import tasks  # heavy: deferred (cm3leon --help)

    cfg, model, toks, _ = tasks.load_model(workdir, overrides=overrides)
    enc = lambda s: model.vocab.text_ids(toks.text.encode(s)) if s else np.zeros(0, np.int32)
    (ids,) = tasks.infill(model, [(enc(before), enc(after))], cfg.generate)
    text = toks.text.decode(model.vocab.to_piece_ids(ids))
    print(f"{before}[{text}]{after}")
    return text
