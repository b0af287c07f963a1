"""`cm3leon prepare`: image-caption pairs -> tokenizers -> tokenized document shards.

    data.dir/
      manifest.json               written last: documents, skipped (reason -> count), vocab,
                                  tokenizer paths, source config, per-stage seconds
      vocab.json                  the unified vocabulary (next to the tokenizers it is built for)
      text_tokenizer.model        sentencepiece model (trained here or copied from prepare.text_tokenizer)
      image_tokenizer/            ImageTokenizer.save directory (trained here or copied)
      documents/shard-*.array_record   records of cm3leon_jax/data/records.py
      documents/shard-*.json      per-shard counts and skipped records (a shard is done when both exist)
      skipped.jsonl               every skipped record: id, reason, detail

Reader processes load and check records, fit pixels to the tokenizer resolution and
tokenize captions; this process encodes images in fixed-shape batches (one compile) and
writes shards in source order, so the output does not depend on the number of workers. A
re-run with the same inputs finds the manifest and returns; an interrupted run redoes only
unfinished shards; a data.dir prepared from other inputs is refused.

data.dir, the source and the given tokenizers may be on cloud storage (storage.py). There
a file is uploaded whole when it is done, so what marks a step done is the same: a shard
is done when its counts file exists, a copied or trained image tokenizer when both its
files exist, the directory when its manifest exists.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import time

import numpy as np
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, VQGANTrainConfig
from cm3leon_jax.data import readers
from cm3leon_jax.data.records import shard_name, write_manifest
from cm3leon_jax.data.shards import ShardPlan, write_one_shard
from cm3leon_jax.data.sources import BadRecord, open_source
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import Path, PathLike
from cm3leon_jax.tokenizers import image_train
from cm3leon_jax.tokenizers.directory import Tokenizers, load_tokenizers
from cm3leon_jax.tokenizers.image import ImageTokenizer
from cm3leon_jax.tokenizers.image_train import train_image_tokenizer
from cm3leon_jax.tokenizers.text import TextTokenizer, train_text_tokenizer
from cm3leon_jax.vocab import Vocab

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """The inputs cannot be prepared (too many bad records, a foreign data.dir, ...)."""


# --- tokenizers -------------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    files = storage.files(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _inputs(cfg: Config) -> dict:
    """Everything the prepared documents depend on (a changed input needs a new data.dir)."""
    p = cfg.prepare
    given = {}
    for key in ("text_tokenizer", "image_tokenizer"):
        if getattr(p, key) is not None:
            path = storage.path(getattr(p, key))
            if not path.exists():
                raise PrepareError(f"prepare.{key}={path} does not exist")
            given[key] = {"path": storage.absolute(path), "digest": _file_digest(path)}
    if p.image_tokenizer is None:  # trained here: its LPIPS files before any reading
        image_train.check_perceptual(cfg.vqgan, cfg.vqgan_train)
    # the resolved image key: a directory prepared before the key could be null compares equal
    source = {**dataclasses.asdict(cfg.source), "image_key": cfg.source.image_field()}
    if not cfg.source.names:  # nor one prepared before named scenes existed, when it has none
        del source["names"], source["zipf"]
    if cfg.source.name_jitter:  # the default, as before the key existed
        del source["name_jitter"]
    inputs = {"source": source, "vocab": dataclasses.asdict(cfg.vocab),
              "text_tokenizer": given.get("text_tokenizer", dataclasses.asdict(cfg.text_tokenizer)),
              "image_tokenizer": given.get("image_tokenizer", {
                  "vqgan": dataclasses.asdict(cfg.vqgan),
                  "vqgan_train": dataclasses.asdict(cfg.vqgan_train)}),
              "shard_size": p.shard_size}
    return json.loads(json.dumps(inputs))  # as it reads back from disk (tuples -> lists)


def _text_tokenizer(cfg: Config, source, out: DataDir) -> TextTokenizer:
    path = out.text_tokenizer
    if cfg.prepare.text_tokenizer is not None:
        tok = TextTokenizer.load(cfg.prepare.text_tokenizer)
    elif path.exists():  # an interrupted run with the same inputs trained it already
        return TextTokenizer.load(path)
    else:
        tt = cfg.text_tokenizer
        n = min(len(source), tt.train_captions)
        captions = []
        for i in np.linspace(0, len(source) - 1, n).round().astype(int):
            try:
                captions.append(source.caption(int(i)))
            except BadRecord:
                pass  # counted when the record itself is read
        t0 = time.perf_counter()
        tok = train_text_tokenizer(captions, cfg.vocab.text_size, model_type=tt.model_type,
                                   byte_fallback=tt.byte_fallback,
                                   character_coverage=tt.character_coverage)
        log.info("text tokenizer: %d pieces from %d captions in %.1fs", tok.size, len(captions),
                 time.perf_counter() - t0)
    tok.save(path)
    return tok


def _image_tokenizer(cfg: Config, source, out: DataDir, text: TextTokenizer, given, progress):
    """The given tokenizer (copied into `out`), the one an interrupted run trained, or a new one."""
    path = out.image_tokenizer
    if given is not None:
        if not ImageTokenizer.saved(path):
            _copy_dir(storage.path(cfg.prepare.image_tokenizer), path)
        return given
    if not ImageTokenizer.saved(path):
        _train_image_tokenizer(cfg, source, out, text, progress)
    return ImageTokenizer.load(path, batch_size=cfg.prepare.batch_size)


def _copy_dir(src: Path, dest: Path) -> None:
    """Copy a directory tree to `dest`: locally a temp copy renamed, so a reader sees it whole
    or not at all; on cloud storage file by file, each an object uploaded whole."""
    if storage.is_remote(dest):
        storage.copy(src, dest)
        return
    tmp = storage.local(dest.with_name(dest.name + ".tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    storage.copy(src, tmp)
    tmp.rename(dest)


def _tokenizer_images(source, indices) -> list:
    """The readable images among source records `indices` (bad ones are skipped here;
    the shard stage counts them)."""
    images = []
    for i in indices:
        items, _ = readers.read_chunk(int(i), int(i) + 1)
        images += [d["pixels"] for d in items if isinstance(d, dict)]
    return images


def tokenizer_split(records: int, t: VQGANTrainConfig) -> tuple[np.ndarray, range]:
    """(record indices the image tokenizer trains on, the held-out ones): the last
    `t.eval_images` records (at most a fifth) are held out; up to `t.images` training
    records are spread evenly over the rest."""
    pool = records - min(t.eval_images, records // 5)
    train = np.unique(np.linspace(0, pool - 1, min(pool, t.images)).round().astype(int))
    return train, range(pool, records)


def _train_image_tokenizer(cfg: Config, source, out: DataDir, text: TextTokenizer, progress):
    """Train the VQ-GAN (cfg.vqgan, cfg.vqgan_train) on images spread evenly over the
    source, and measure it on held-out ones: the last `vqgan_train.eval_images` records
    (at most a fifth of the source), which training never draws."""
    t = cfg.vqgan_train
    train, held = tokenizer_split(len(source), t)
    readers.init(source, text.model_proto, cfg.vqgan.resolution)
    images = _tokenizer_images(source, train)
    if len(images) < t.batch_size:
        raise PrepareError(f"{len(images)} readable images to train the image tokenizer, fewer "
                           f"than vqgan_train.batch_size={t.batch_size}")
    heldout = _tokenizer_images(source, held)
    if not heldout:
        raise PrepareError(f"no readable held-out image among the last {len(held)} of "
                           f"{len(source)} records to measure the image tokenizer on")
    workdir = out.image_tokenizer_training  # metrics.jsonl, summary.json, reconstructions.png
    _, summary = train_image_tokenizer(cfg.vqgan, t, np.stack(images), workdir,
                                       np.stack(heldout), progress=progress)
    log.info("image tokenizer, on %d held-out images (source records %d..%d, never trained "
             "on): PSNR %.2f dB, codebook usage %.2f", summary["eval_images"], held.start,
             len(source) - 1, summary["psnr"], summary["codebook_usage"])
    storage.move_aside(workdir / image_train.TOKENIZER_DIR, out.image_tokenizer)


# --- the run ------------------------------------------------------------------------------

def _claim(out: DataDir, inputs: dict, mark: bool = True) -> None:
    """Mark `out` as prepared from `inputs` (with `mark`; else only check), or refuse when
    it holds another preparation."""
    marker = out.inputs
    if marker.exists():
        old = json.loads(marker.read_text())
        if old != inputs:
            diff = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
            raise PrepareError(f"{out.root} was prepared from other inputs (differs in {diff}); "
                               "use another data.dir or delete it")
        return
    if out.root.exists() and any(out.root.iterdir()):
        raise PrepareError(f"{out.root} is not empty and holds no preparation of ours")
    if not mark:
        return
    out.root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def prepare(cfg: Config, progress: bool = True) -> dict:
    """Prepare `cfg.data.dir` from `cfg.source`; returns the manifest."""
    if cfg.data.dir is None:
        raise PrepareError("data.dir: say where the prepared documents go")
    out = DataDir(cfg.data.dir)
    inputs = _inputs(cfg)
    _claim(out, inputs, mark=False)
    if out.manifest.exists():
        manifest = json.loads(out.manifest.read_text())
        log.info("%s is already prepared (%d documents)", out.root, manifest["documents"])
        return manifest

    started = time.perf_counter()
    seconds = collections.Counter()
    given = None
    if cfg.prepare.image_tokenizer is not None:
        given = ImageTokenizer.load(cfg.prepare.image_tokenizer, cfg.prepare.batch_size)
        for key in ("resolution", "codebook_size", "tokens_per_image"):
            have, said = getattr(given.config, key), getattr(cfg.vqgan, key)
            if have != said:  # the config would describe a tokenizer the data was not made with
                raise PrepareError(f"prepare.image_tokenizer={cfg.prepare.image_tokenizer} has "
                                   f"{key} {have} but vqgan.{key} is {said}; set vqgan.* to "
                                   "the tokenizer's, or drop prepare.image_tokenizer")
    resolution = cfg.source.resolution or (given or cfg.vqgan).resolution
    source = open_source(cfg.source, resolution)
    total = len(source)
    _claim(out, inputs)  # only now: a source that does not open claims nothing

    t0 = time.perf_counter()
    text = _text_tokenizer(cfg, source, out)
    seconds["text_tokenizer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = _image_tokenizer(cfg, source, out, text, given, progress)
    seconds["image_tokenizer"] = time.perf_counter() - t0
    vocab = cfg.vocab.build()
    try:
        vocab.check_tokenizers(text.size, image.codebook_size)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    vocab.save(out.vocab, text_pieces=text.size, text_tokenizer=out.text_tokenizer.name,
               image_tokenizer=out.image_tokenizer.name)

    shard_size = cfg.prepare.shard_size
    n_shards = max(1, math.ceil(total / shard_size))
    plan = ShardPlan(str(out.root), n_shards, shard_size, total, cfg.prepare.batch_size)
    have = ({p.name for p in out.documents.iterdir()} if out.documents.exists() else set())
    todo = [i for i in range(n_shards)  # one listing, not two requests per shard
            if not {plan.path(i).name, plan.path(i).with_suffix(".json").name} <= have]
    stats = {i: _shard_stats(plan.path(i)) for i in sorted(set(range(n_shards)) - set(todo))}

    def check_bad():  # once more are bad than allowed, no later shard can bring it back
        bad = sum(sum(s["skipped"].values()) for s in stats.values())
        if bad > cfg.prepare.max_bad_fraction * total:
            _write_skipped(out, stats)
            raise PrepareError(
                f"{bad} of {total} records are bad, more than prepare.max_bad_fraction="
                f"{cfg.prepare.max_bad_fraction} allows; see {out.skipped}")

    if cfg.prepare.runner == "beam" and todo:
        from cm3leon_jax.data import beam_shards  # optional: apache-beam only for this runner

        t0 = time.perf_counter()
        beam_shards.run(plan, todo, source, text.model_proto, cfg, progress)
        seconds["beam_shards"] += time.perf_counter() - t0
        stats.update({i: _shard_stats(plan.path(i)) for i in todo})
    elif todo:
        _write_shards_here(plan, todo, source, text, image, vocab, cfg, stats, seconds,
                           check_bad, progress)
    check_bad()
    skipped = _write_skipped(out, stats)
    documents = sum(s["documents"] for s in stats.values())
    return write_manifest(
        out.root, documents, [shard_name(i, n_shards) for i in range(n_shards)],
        records=total, skipped=dict(sorted(skipped.items())),
        vocab=vocab.to_json(), text_pieces=text.size, text_tokenizer=out.text_tokenizer.name,
        image_tokenizer=out.image_tokenizer.name, resolution=image.resolution,
        tokens_per_image=image.tokens_per_image, source=dataclasses.asdict(cfg.source),
        inputs=inputs, seconds={k: round(v, 3) for k, v in sorted(seconds.items())},
        wall_seconds=round(time.perf_counter() - started, 3))


def _write_shards_here(plan: ShardPlan, todo, source, text, image, vocab, cfg, stats, seconds,
                       check_bad, progress) -> None:
    """The local runner: reader processes feed this process, which encodes and writes the
    shards in order."""
    chunks = [c for i in todo for c in plan.chunks(i)]
    workers = cfg.prepare.workers
    pool = (multiprocessing.get_context("spawn").Pool(
        workers, readers.init, (source, text.model_proto, image.resolution))
        if workers else None)
    if pool is None:
        readers.init(source, text.model_proto, image.resolution)
    bar = tqdm(total=plan.total, initial=plan.total - sum(hi - lo for lo, hi in chunks),
               unit="pair", desc=f"prepare {DataDir(plan.root).root.name}", disable=not progress)
    try:
        results = readers.ordered_chunks(pool, chunks, window=4 * max(1, workers))
        for i in todo:
            stats[i] = write_one_shard(plan, i, results, image, vocab, seconds, bar)
            check_bad()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def _write_skipped(out: DataDir, stats: dict) -> collections.Counter:
    """skipped.jsonl of the shards done so far; returns the counts per reason."""
    skipped = collections.Counter()
    with out.skipped.open("w") as f:
        for i in sorted(stats):
            skipped.update(stats[i]["skipped"])
            for record_id, reason, detail in stats[i]["skipped_records"]:
                f.write(json.dumps({"id": record_id, "reason": reason, "detail": detail}) + "\n")
    return skipped


def _shard_stats(path: Path) -> dict:
    """The counts and skipped records of a finished shard."""
    s = json.loads(path.with_suffix(".json").read_text())
    s["skipped"] = collections.Counter(s["skipped"])
    return s


# --- reading a prepared directory ----------------------------------------------------------

def open_prepared(data_dir: PathLike, batch_size: int = 32) -> tuple[dict, Tokenizers]:
    """What `prepare` wrote: its manifest and tokenizers (fails when the run did not finish)."""
    d = DataDir(data_dir)
    if not d.manifest.exists():
        raise FileNotFoundError(f"{d.manifest} does not exist: run `cm3leon prepare` first "
                                "(or let it finish)")
    return (json.loads(d.manifest.read_text()),
            load_tokenizers(d.root, Vocab.load(d.vocab), batch_size, str(d.root)))
