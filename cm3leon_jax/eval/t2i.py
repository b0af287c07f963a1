"""`cm3leon eval t2i`: the text-to-image protocol behind a published FID, in one command.

N captions are drawn with a seed, images generated in batches with the stated decoding
(guidance scale, retrieval at inference from the run's index, M samples kept by CLIP), and
scored: FID against a real set (a folder or saved statistics), CLIP score, and with
retrieval how close each image is to the images it was shown (the over-copying critique of
static retrieval). `report.json` holds every setting needed to reproduce the numbers; a
PNG grid shows the first images. CM3Leon's headline protocol is MS-COCO FID-30K with two
retrieved documents and 8 samples reranked by CLIP (paper_spec §7.1; docs/eval.md).
Every input and `--out` may be on cloud storage (storage.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.eval import clip_score as clip_score_lib
from cm3leon_jax.eval import fid as fid_lib
from cm3leon_jax.generate import tasks
from cm3leon_jax.generate.grid import image_grid, save_image
from cm3leon_jax.generate.rerank import clip_scorer, rerank
from cm3leon_jax.perception import clip as clip_lib
from cm3leon_jax.perception import inception as inception_lib
from cm3leon_jax.retrieval.query import Retriever

COPY_THRESHOLD = 0.95  # CLIP image cosine above which an image counts as a near-copy


@dataclasses.dataclass(frozen=True)
class T2IRequest:
    workdir: str  # run directory or export
    captions: str  # JSONL ({"caption": ...} per line) or a COCO captions_*.json
    real: str  # folder of real images, or a .npz of FID statistics (mu, sigma)
    out: str
    inception_weights: str
    num: int = 30000
    seed: int = 0
    cfg_scale: float | None = None  # null: the run's generate.cfg_scale
    retrieve: int = 0  # documents retrieved per caption at inference (0: none)
    samples: int = 1  # candidates per caption; the best by CLIP is kept
    rerank: str = "none"  # "clip" (needs clip) or "none" (the first candidate)
    clip: str | None = None  # CLIPModel directory: CLIP score, reranking, copy measure
    batch_size: int = 16  # captions per generation batch
    dims: int = 2048  # Inception features (2048: every published FID)
    center_crop: bool = False  # crop --real images to their central square first
    real_drawn: bool = False  # real set: only the --real images the drawn captions came from
    overrides: tuple[str, ...] = ()


def read_caption_file(path: storage.PathLike) -> list[dict]:
    """`{"caption": ..., "source": ...}` records: a JSONL file's lines (`{"caption": ...}`,
    any `image` kept as the source), or COCO's `captions_*.json`, one caption per image
    (its first in the file, so an image is never drawn twice) with the image's file name."""
    path = storage.path(path)
    if not path.is_file():
        raise ConfigError(f"--captions {path} does not exist")
    if path.suffix == ".json":
        return _coco_captions(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
            raise ConfigError(f'{path}:{n}: expected {{"caption": TEXT, ...}}')
        out.append({"caption": record["caption"], "source": record.get("image")})
    if not out:
        raise ConfigError(f"{path}: no captions")
    return out


def _coco_captions(path: storage.Path) -> list[dict]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list):
        raise ConfigError(f"{path}: a .json caption file must be COCO's "
                          "{\"annotations\": [{\"image_id\": ..., \"caption\": ...}]}; "
                          "use JSONL otherwise")
    files = {im.get("id"): im.get("file_name") for im in raw.get("images", [])
             if isinstance(im, dict)}
    first: dict = {}
    for i, a in enumerate(raw["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise ConfigError(f"{path}: annotations[{i}] has no string \"caption\"")
        first.setdefault(a.get("image_id", f"annotation {i}"), a["caption"].strip())
    return [{"caption": c, "source": files.get(k)} for k, c in first.items()]


def draw_captions(records: list[dict], num: int, seed: int, where: str) -> list[dict]:
    """`num` distinct records drawn with `seed` (the FID-30K draw), in draw order."""
    if not 2 <= num <= len(records):
        raise ConfigError(f"--num {num}: {where} has {len(records)} captions; draw 2.."
                          f"{len(records)} (FID needs two images at least)")
    pick = np.random.default_rng(seed).choice(len(records), num, replace=False)
    return [records[i] for i in pick]


def _check(req: T2IRequest) -> None:
    """Every input before any weight is read or image generated."""
    if req.samples < 1 or req.batch_size < 1 or req.retrieve < 0:
        raise ConfigError("--samples and --batch-size must be >= 1, --retrieve >= 0")
    if req.dims not in inception_lib.DIMS:
        raise ConfigError(f"--dims {req.dims}: choose one of {inception_lib.DIMS}")
    if req.rerank not in ("clip", "none"):
        raise ConfigError(f"--rerank {req.rerank}: choose clip or none")
    if req.rerank == "clip" and req.clip is None:
        raise ConfigError("--rerank clip needs --clip DIR (a transformers CLIPModel directory)")
    if req.samples > 1 and req.rerank == "none":
        raise ConfigError(f"--samples {req.samples} without --rerank clip would keep the "
                          "first candidate and waste the rest; add --rerank clip")
    if req.retrieve and req.clip is None:
        raise ConfigError(f"--retrieve {req.retrieve} also measures how close each image is "
                          "to the images it was shown, with CLIP: add --clip DIR")
    if not storage.path(req.inception_weights).is_file():
        raise ConfigError(f"--inception-weights {req.inception_weights} does not exist")
    real = storage.path(req.real)
    if req.real_drawn and not real.is_dir():
        raise ConfigError(f"--real-drawn reads the drawn captions' images from --real: "
                          f"{real} is not a folder")
    if not (real.is_dir() or (real.suffix == ".npz" and real.is_file())):
        raise ConfigError(f"--real {real}: expected a folder of images or a .npz of "
                          "statistics (`cm3leon eval fid --save-stats`)")
    if req.clip is not None and not storage.path(req.clip).is_dir():
        raise ConfigError(f"--clip {req.clip} is not a directory")
    images = storage.path(req.out) / "images"
    if images.is_dir() and any(images.iterdir()):
        raise ConfigError(f"--out {req.out}: {images} already holds images; FID of that "
                          "folder would mix runs. Choose a new --out or empty it")


class _Scores:
    """What the report needs, accumulated batch by batch so 30,000 images are never held in
    memory at once: Inception features, CLIP pair scores, copy cosines, the grid's images."""

    def __init__(self, inception, clip, dims: int, grid: int = 64):
        self.inception, self.clip, self.dims, self.grid = inception, clip, dims, grid
        self.features, self.clip_pairs, self.copy, self.first = [], [], [], []

    def add(self, images: np.ndarray, captions: list[str], shown: list | None) -> None:
        self.features.append(inception_lib.pool_features(
            self.inception, inception_lib.resize_for_inception(images), dims=self.dims))
        if self.clip is not None:  # each image embedded once, for both measures
            emb = clip_lib.embed_images(self.clip, images).astype(np.float64)
            text = clip_lib.embed_texts(self.clip, captions).astype(np.float64)
            self.clip_pairs.append(clip_score_lib.score_of((emb * text).sum(-1)))
            if shown is not None:
                self.copy += [None if seen is None else copy_cosine(self.clip, e, seen)
                              for e, seen in zip(emb, shown)]
        self.first += list(images[:max(0, self.grid - len(self.first))])

    def report(self, real_mu, real_sigma, n_real, retrieve: int) -> dict:
        features = np.concatenate(self.features)
        out = {"fid": fid_lib.frechet_distance(*fid_lib.statistics(features), real_mu,
                                               real_sigma),
               "n_fake": len(features), "n_real": n_real}
        if self.clip is not None:
            out["clip_score"] = float(np.concatenate(self.clip_pairs).mean())
        if retrieve:
            best = np.asarray([c for c in self.copy if c is not None])
            out["retrieved_images"] = len(best)
            if len(best):
                out["copy_cosine_mean"] = float(best.mean())
                out[f"copy_share_above_{COPY_THRESHOLD}"] = float(np.mean(best > COPY_THRESHOLD))
        return out


def copy_cosine(clip, embedding: np.ndarray, shown: np.ndarray) -> float:
    """CLIP image cosine of a generated image (its embedding) to the closest image it was
    shown."""
    return float(np.max(clip_lib.embed_images(clip, shown) @ embedding))


@dataclasses.dataclass(frozen=True)
class _Generator:
    cfg: object
    model: tasks.Model
    toks: object
    step: int
    retriever: Retriever | None


def load_generator(req: T2IRequest) -> _Generator:
    """The run's model, tokenizers and (with --retrieve) index: every check on the run
    before the real set is embedded."""
    overrides = [*req.overrides, f"generate.candidates={req.samples}",
                 f"generate.seed={req.seed}"]
    if req.cfg_scale is not None:
        overrides.append(f"generate.cfg_scale={req.cfg_scale}")
    cfg, model, toks, step = tasks.load_model(req.workdir, overrides=overrides)
    return _Generator(cfg, model, toks, step, Retriever(cfg) if req.retrieve else None)


def generate(req: T2IRequest, gen: _Generator, captions: list[str], scores: _Scores,
             out: storage.Path) -> None:
    """Generate for `captions` in batches; each batch is saved as PNGs and scored."""
    model, toks = gen.model, gen.toks
    n_tokens = toks.image.tokens_per_image
    text_ids = [model.vocab.text_ids(toks.text.encode(c)) for c in captions]
    for b in tqdm(range(0, len(captions), req.batch_size), desc="t2i", unit="batch"):
        caps, ids = captions[b:b + req.batch_size], text_ids[b:b + req.batch_size]
        retrieved = gen.retriever.documents(caps, ids, req.retrieve) if gen.retriever else None
        codes = tasks.text_to_image(model, ids, n_tokens, gen.cfg.generate, seed=req.seed + b,
                                    retrieved=retrieved)
        pixels = toks.image.decode(codes.reshape(-1, n_tokens))
        pixels = pixels.reshape(len(caps), req.samples, *pixels.shape[1:])
        if req.samples > 1:
            best, _ = rerank(list(pixels), caps, clip_scorer(scores.clip))
            pixels = pixels[np.arange(len(caps)), best[:, 0]]
        else:
            pixels = pixels[:, 0]
        for i, im in enumerate(pixels):
            save_image(out / "images" / f"{b + i:06d}.png", im)
        shown = None
        if retrieved is not None:
            shown = []
            for docs in retrieved:
                found = [model.vocab.to_codes(d[model.vocab.is_image(d)]) for d in docs]
                found = [c for c in found if len(c) == n_tokens]
                shown.append(toks.image.decode(np.stack(found)) if found else None)
        scores.add(pixels, caps, shown)


def _real_stats(req: T2IRequest, drawn: list[dict], inception) -> tuple:
    """(mu, sigma, n) of the real set: the --real folder or statistics, or with
    --real-drawn the folder's images of the drawn captions (a set as large as the fakes)."""
    if not req.real_drawn:
        return fid_lib.stats_of(req.real, inception, dims=req.dims, center_crop=req.center_crop)
    files = [storage.path(req.real) / r["source"] for r in drawn if r["source"]]
    missing = [f for f in files if not f.is_file()]
    if len(files) < len(drawn) or missing:
        raise ConfigError(f"--real-drawn: {len(drawn) - len(files)} drawn captions name no "
                          f"source image and {len(missing)} named images are not in "
                          f"{req.real}" + (f" (first: {missing[0]})" if missing else ""))
    features = fid_lib.features_of_files(files, inception, dims=req.dims,
                                         center_crop=req.center_crop)
    return (*fid_lib.statistics(features), len(features))


def run_t2i(req: T2IRequest) -> dict:
    """Generate, score and write `report.json`, `grid.png`, `captions.jsonl` (and with
    --retrieve `copy.jsonl`) and `images/`; returns the report."""
    _check(req)
    drawn = draw_captions(read_caption_file(req.captions), req.num, req.seed, req.captions)
    captions = [r["caption"] for r in drawn]
    gen = load_generator(req)
    inception = inception_lib.load_inception(req.inception_weights)
    clip = clip_lib.load_clip(req.clip) if req.clip else None
    real_mu, real_sigma, n_real = _real_stats(req, drawn, inception)
    out = storage.path(req.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.png" for i in range(len(drawn))]
    (out / "captions.jsonl").write_text("".join(
        json.dumps({"image": name, "caption": r["caption"], "source": r["source"]}) + "\n"
        for name, r in zip(names, drawn)))
    scores = _Scores(inception, clip, req.dims)
    generate(req, gen, captions, scores, out)
    save_image(out / "grid.png", image_grid(np.stack(scores.first), 8))
    if req.retrieve:
        (out / "copy.jsonl").write_text("".join(
            json.dumps({"image": name, "copy_cosine": c}) + "\n"
            for name, c in zip(names, scores.copy)))
    report = scores.report(real_mu, real_sigma, n_real, req.retrieve)
    report["settings"] = {
        **{k: v for k, v in dataclasses.asdict(req).items() if k != "overrides"},
        "overrides": list(req.overrides), "checkpoint_step": gen.step,
        "generate": dataclasses.asdict(gen.cfg.generate),
        "image_resolution": gen.toks.image.resolution, "fid_resize": inception_lib.RESIZE_RULE,
        "copy_threshold": COPY_THRESHOLD,
        # the same CLIP picked the kept sample: its score is biased upward by the choice
        "clip_score_after_clip_rerank": req.rerank == "clip"}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
