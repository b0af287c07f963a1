"""`cm3leon score`, `cm3leon eval fid|clip-score|t2i` and `cm3leon tokenizer eval-image`:
their parsers and what they run.

    cm3leon score (--workdir RUN [--step N] | --export DIR) --tokens IN.npy --out OUT.npy
    cm3leon eval fid --real DIR_OR_NPZ --fake DIR --inception-weights FILE [--json]
    cm3leon eval clip-score --clip DIR --images DIR --captions FILE.jsonl [--json]
    cm3leon eval t2i --workdir RUN --captions FILE --real DIR_OR_NPZ --inception-weights F
                     --out DIR [--num N --seed S --cfg A --retrieve K --samples M
                     --rerank clip --clip DIR]
    cm3leon tokenizer eval-image --tokenizer DIR [--config FILE] [--source KIND] [--num N]
                     [--inception-weights F --fid-dims D] [--lpips-vgg F --lpips-heads F]
                     [--batch-size B] [--out FILE.json] [section.key=value ...]

Every file and folder may be on cloud storage (storage.py). Stage modules are imported
when the command runs, so `cm3leon --help` does not load jax.
"""

from __future__ import annotations

import json

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.config.cli import with_config


def add_commands(sub) -> None:
    p = sub.add_parser("score", help="per-token log-probabilities of token sequences")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory (its checkpoints/)")
    src.add_argument("--export", help="directory written by `export --format safetensors`")
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
    p.add_argument("--tokens", required=True, help="[B, T] integer token ids (.npy)")
    p.add_argument("--out", required=True, help="[B, T-1] float32 log-probabilities (.npy)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows per step over all devices (rounded up to the data-parallel size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: the run's model.dtype)")
    p.set_defaults(fn=run_score)

    ev = sub.add_parser("eval", help="FID, CLIP score and the text->image protocol")
    kinds = ev.add_subparsers(dest="kind", required=True)
    f = kinds.add_parser("fid", help="Frechet Inception distance between two image sets")
    f.add_argument("--real", required=True, help="folder of images, or a .npz of statistics")
    f.add_argument("--fake", help="folder of images, or a .npz of statistics")
    f.add_argument("--inception-weights",
                   help="the FID Inception weights (pt_inception-2015-12-05-6726825d.pth or "
                        "weights-inception-2015-12-05-6726825d.pth; .npz/.safetensors too); "
                        "needed when either side is a folder")
    f.add_argument("--center-crop", action="store_true",
                   help="crop each image of a folder to its central square before resizing")
    f.add_argument("--save-stats", help="write the statistics of --real to this .npz")
    f.add_argument("--batch-size", type=int, default=50)
    f.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                   help="Inception feature layer (2048: every published FID)")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(fn=run_fid)
    c = kinds.add_parser("clip-score", help="mean 100 * max(cos, 0) of images and captions")
    c.add_argument("--clip", required=True, help="transformers CLIPModel directory")
    c.add_argument("--images", required=True, help="folder the captions' images are in")
    c.add_argument("--captions", required=True,
                   help='JSONL: {"image": FILE, "caption": TEXT} per line')
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(fn=run_clip_score)
    t = kinds.add_parser("t2i", help="generate for N drawn captions; FID, CLIP score, report")
    t.add_argument("--workdir", required=True, help="run directory or export")
    t.add_argument("--captions", required=True,
                   help='JSONL ({"caption": TEXT} per line) or COCO captions_*.json')
    t.add_argument("--real", required=True, help="folder of real images, or a .npz of statistics")
    t.add_argument("--inception-weights", required=True, help="the FID Inception weights file")
    t.add_argument("--out", required=True, help="report.json, grid.png, images/ go here")
    t.add_argument("--num", type=int, default=30000, help="captions drawn (FID-30K: 30000)")
    t.add_argument("--seed", type=int, default=0, help="the caption draw and the sampling")
    t.add_argument("--cfg", type=float, help="guidance scale (default: the run's)")
    t.add_argument("--retrieve", type=int, default=0, help="documents retrieved per caption")
    t.add_argument("--samples", type=int, default=1, help="candidates per caption")
    t.add_argument("--rerank", choices=["clip", "none"], default="none",
                   help="keep the best of --samples by CLIP similarity")
    t.add_argument("--clip", help="CLIPModel directory: CLIP score, reranking, copy measure")
    t.add_argument("--batch-size", type=int, default=16, help="captions per generation batch")
    t.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                   help="Inception feature layer (2048: every published FID)")
    t.add_argument("--center-crop", action="store_true",
                   help="crop each --real image to its central square before resizing")
    t.add_argument("--real-drawn", action="store_true",
                   help="real set = the --real images of the drawn captions (COCO file_name "
                        "or the JSONL's image), as many as the generated ones")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="e.g. generate.temperature=0.7")
    t.set_defaults(fn=run_t2i)


def add_tokenizer_commands(tok) -> None:
    """`eval-image` among the `tokenizer` commands (cm3leon_jax/cli.py joins them)."""
    p = with_config(tok.add_parser(
        "eval-image", help="PSNR, SSIM, LPIPS, codebook usage, rFID (and the shapes "
                           "detector) of an image tokenizer on held-out images"),
        required=False)
    p.add_argument("--tokenizer", required=True, help="saved image tokenizer directory")
    p.add_argument("--source", metavar="KIND",
                   help="source.kind (default: the config's); its other settings as "
                        "source.key=value")
    p.add_argument("--num", type=int,
                   help="held-out images measured (default: vqgan_train.eval_images)")
    p.add_argument("--inception-weights",
                   help="the FID Inception weights file: the standard rFID; without it the "
                        "features come from a random-init Inception, named so in the output")
    p.add_argument("--fid-dims", type=int, default=2048, choices=[64, 192, 768, 2048],
                   help="Inception feature layer (2048: every published FID)")
    p.add_argument("--lpips-vgg", help="torchvision's vgg16-397923af.pth (or its .npz)")
    p.add_argument("--lpips-heads", help="lpips' weights/v0.1/vgg.pth (or its .npz)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode/decode step")
    p.add_argument("--out", help="write every number as JSON to this file")
    p.set_defaults(fn=run_eval_image)


def _line(result: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in result.items())


def _print(result: dict, as_json: bool) -> None:
    print(json.dumps(result) if as_json else _line(result))


def run_fid(args) -> None:
    from cm3leon_jax.eval import fid  # heavy: deferred so cm3leon --help stays fast
    from cm3leon_jax.perception import inception  # heavy: as above

    if args.fake is None and args.save_stats is None:
        raise ConfigError("give --fake (to measure) or --save-stats (to keep --real's "
                          "statistics)")
    for name in ("real", "fake"):
        path = getattr(args, name)
        if path is not None and not storage.path(path).exists():
            raise ConfigError(f"--{name} {path} does not exist")
    if (args.inception_weights is not None
            and not storage.path(args.inception_weights).is_file()):
        raise ConfigError(f"--inception-weights {args.inception_weights} does not exist")
    if args.inception_weights is None and any(
            p is not None and storage.path(p).is_dir() for p in (args.real, args.fake)):
        raise ConfigError("--inception-weights: a folder of images needs the FID Inception "
                          "weights file")
    if args.save_stats is not None and not args.save_stats.endswith(".npz"):
        raise ConfigError(f"--save-stats {args.save_stats}: name a .npz file")
    folders = any(p is not None and storage.path(p).is_dir() for p in (args.real, args.fake))
    net = inception.load_inception(args.inception_weights) if folders else None
    mu, sigma, n = fid.stats_of(args.real, net, args.batch_size, args.dims, args.center_crop)
    if args.save_stats:
        fid.save_stats(args.save_stats, mu, sigma, n)
    if args.fake is None:
        print(f"statistics of {n} images of {args.real} -> {args.save_stats}")
        return
    mu2, sigma2, n2 = fid.stats_of(args.fake, net, args.batch_size, args.dims, args.center_crop)
    _print({"fid": fid.frechet_distance(mu2, sigma2, mu, sigma), "n_real": n, "n_fake": n2},
           args.json)


def run_clip_score(args) -> None:
    from cm3leon_jax.eval import clip_score  # heavy: deferred so cm3leon --help stays fast
    from cm3leon_jax.perception import clip  # heavy: as above

    _print(clip_score.clip_score_files(clip.load_clip(args.clip), args.images, args.captions,
                                       args.batch_size), args.json)


def run_t2i(args) -> None:
    from cm3leon_jax.eval import t2i  # heavy: deferred so cm3leon --help stays fast

    req = t2i.T2IRequest(
        workdir=args.workdir, captions=args.captions, real=args.real, out=args.out,
        inception_weights=args.inception_weights, num=args.num, seed=args.seed,
        cfg_scale=args.cfg, retrieve=args.retrieve, samples=args.samples, rerank=args.rerank,
        clip=args.clip, batch_size=args.batch_size, dims=args.dims,
        center_crop=args.center_crop, real_drawn=args.real_drawn,
        overrides=tuple(args.overrides))
    report = t2i.run_t2i(req)
    scores = {k: v for k, v in report.items() if k != "settings"}
    print(f"{_line(scores)} -> {storage.path(args.out) / 'report.json'}")


def run_eval_image(args) -> None:
    from cm3leon_jax.eval import image_tokenizer  # heavy: deferred so cm3leon --help stays fast

    overrides = ([f"source.kind={args.source}"] if args.source else []) + args.overrides
    result = image_tokenizer.run(
        load_config(args.config, overrides), args.tokenizer, args.num,
        args.inception_weights, args.fid_dims, args.lpips_vgg, args.lpips_heads,
        args.batch_size, args.out)
    print(image_tokenizer.summary_line(result)
          + (f" -> {args.out}" if args.out is not None else ""))


def run_score(args) -> None:
    from cm3leon_jax.eval import score  # heavy: deferred so cm3leon --help stays fast
    from cm3leon_jax.train import weights  # heavy: as above

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if args.export is not None and args.step is not None:
        raise ConfigError("--step applies to --workdir runs only")
    tokens = score.load_tokens(args.tokens)  # every check before any weight is read
    path = args.workdir or args.export
    cfg, _, _ = weights.saved_config(path, args.step)
    score.check_tokens(tokens, cfg, args.tokens)
    w = weights.load(path, args.step, dtype=args.dtype)
    s = score.save_scores(score.score_tokens(w, tokens, args.batch_size), args.out)
    print(f"scored {s['rows']} rows ({s['tokens']} tokens) with {w.origin}: "
          f"mean log-prob {s['mean_logprob']:.4f}, perplexity {s['perplexity']:.3f} "
          f"-> {s['out']}")
