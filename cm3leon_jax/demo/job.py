"""`cm3leon demo`: the whole flow on the built-in shapes data, under one directory.

    DIR/data              prepare: text + image tokenizers, document shards
    DIR/heldout           demo.heldout_docs scenes of another seed, the same tokenizers:
                          train.eval_dir (the held-out loss curve)
    DIR/data/retrieval    encoder, index, neighbors (the training table)
    DIR/run               the CM3Leon run (checkpoints, metrics.jsonl)
    DIR/ablation/k0       demo.baseline=true: the same model trained without retrieved documents
                          on the same rows and steps (`cm3leon ablate-retrieval` reuses it)
    DIR/evaluation.json   generated-sample scores (reused while the config is the same)
    DIR/report.md, report.json, loss.png, samples.png

Each stage calls the stage's own Python function and is skipped when its output is
complete (prepare and train also resume a half-done run themselves), so a re-run reuses
what is there. Scores come from pixels (shapes/detector.py) on held-out scenes: the
scene indices after `source.size`, which training never saw. Next to those accuracies, a
distribution-level score: the Fréchet distance (FID's formula, eval/fid.py) between the
generated and the true held-out images in the image space of the run's retrieval dual
encoder. No Inception weights ship (nothing here downloads), and ImageNet features of
32x32 flat-colour scenes would say little; the dual encoder was trained on these scenes,
so its space separates what the captions name (colour, shape, size, place). DIR may be on
cloud storage (storage.py).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError, SourceConfig, load_config
from cm3leon_jax.data.prepare import prepare
from cm3leon_jax.data.sources import ShapesSource, fit_image, open_source
from cm3leon_jax.demo import pretrained
from cm3leon_jax.eval import fid
from cm3leon_jax.generate import tasks
from cm3leon_jax.generate.grid import image_grid, save_image
from cm3leon_jax.generate.rerank import dual_scorer, rerank
from cm3leon_jax.layout import DataDir, DemoDir, RunDir, retrieval_dir
from cm3leon_jax.retrieval import index as index_lib
from cm3leon_jax.retrieval import neighbors, train_encoder
from cm3leon_jax.retrieval.query import Retriever
from cm3leon_jax.shapes import detector
from cm3leon_jax.shapes.world import COLOURS, SHAPES, shapes_caption
from cm3leon_jax.train import checkpoint
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.trainer import train

MODES = {  # report key -> (classifier-free guidance, retrieval)
    "t2i_accuracy": (False, False),
    "t2i_accuracy_cfg": (True, False),
    "t2i_accuracy_retrieval": (False, True),
    "t2i_accuracy_retrieval_cfg": (True, True),
}
RERANKED = "t2i_accuracy_cfg_rerank"  # demo.rerank_samples CFG samples, the best kept


def demo_config(config_path: storage.PathLike, workdir: storage.PathLike,
                overrides=()) -> Config:
    """The demo's config with every stage's outputs under `workdir`."""
    root = storage.path(workdir)
    out = DemoDir(root if storage.is_remote(root) else root.resolve())
    cfg = load_config(config_path, [f"data.dir={out.data.root}",
                                    f"train.eval_dir={out.heldout.root}", *overrides],
                      num_devices=jax.device_count())
    if cfg.demo.image_tokenizer == "train" or cfg.prepare.image_tokenizer is not None:
        return cfg
    if cfg.source.kind != "shapes":
        raise ConfigError(f"demo.image_tokenizer=packaged was trained on shapes scenes, and "
                          f"source.kind is {cfg.source.kind!r}: set demo.image_tokenizer=train "
                          "to train one on this data")
    pretrained.check_matches(cfg.vqgan)
    return dataclasses.replace(cfg, prepare=dataclasses.replace(
        cfg.prepare, image_tokenizer=str(pretrained.DIRECTORY)))


def with_k(cfg: Config, k: int) -> Config:
    """`cfg` training with k retrieved documents per row, all else equal."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, k=k))


def uses_packaged(cfg: Config) -> bool:
    """The demo tokenizes with the package's tokenizer (`demo.image_tokenizer=packaged`)."""
    return cfg.prepare.image_tokenizer == str(pretrained.DIRECTORY)


def has_baseline(cfg: Config) -> bool:
    """Whether the demo trains the no-retrieval baseline (a k = 0 demo is its own)."""
    return cfg.demo.baseline and cfg.data.k > 0


HELD_OUT_KINDS = ("shapes", "fashion_mnist")  # sources with data training never reads


def unseen_source(cfg: Config, size: int) -> SourceConfig:
    """`size` items training never reads: shapes scenes of the next seed, Fashion-MNIST's
    test split (the held-out documents are its first `demo.heldout_docs`)."""
    s = cfg.source
    if s.kind == "fashion_mnist":
        return dataclasses.replace(s, split="test", size=size)
    if s.kind != "shapes":
        raise ConfigError(f"source.kind={s.kind!r}: the demo holds data out of "
                          f"{' and '.join(HELD_OUT_KINDS)} only")
    return dataclasses.replace(s, seed=s.seed + 1, size=size)


def heldout_config(cfg: Config) -> Config:
    """`prepare` of the held-out documents: data training never reads (`unseen_source`),
    the training data's own tokenizers, so their tokens mean the same."""
    data = DataDir(cfg.data.dir)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, dir=cfg.train.eval_dir),
        source=unseen_source(cfg, cfg.demo.heldout_docs),
        prepare=dataclasses.replace(cfg.prepare, text_tokenizer=str(data.text_tokenizer),
                                    image_tokenizer=str(data.image_tokenizer)))


def held_out_source(cfg: Config, resolution: int) -> ShapesSource:
    """The training source's generator, `demo.eval_scenes` scenes longer."""
    s = cfg.source
    return open_source(dataclasses.replace(s, size=s.size + cfg.demo.eval_scenes), resolution)


def held_out(cfg: Config, resolution: int) -> list:
    """The `demo.eval_scenes` scored items: shapes scenes `source.size ..` of the training
    source's generator; Fashion-MNIST test images after the held-out documents, fitted to
    `resolution` as `prepare` fits them."""
    n = cfg.demo.eval_scenes
    if cfg.source.kind == "shapes":
        source = held_out_source(cfg, resolution)
        return [source[i] for i in range(cfg.source.size, len(source))]
    first = cfg.demo.heldout_docs
    source = open_source(unseen_source(cfg, first + n), resolution)
    if len(source) < first + n:
        raise ConfigError(f"demo.heldout_docs + demo.eval_scenes = {first + n}: the "
                          f"{cfg.source.kind} held-out split has {len(source)} items")
    return [p._replace(image=fit_image(p.image, resolution))
            for p in (source[i] for i in range(first, first + n))]


def fd_key(mode: str) -> str:
    """The Fréchet-distance key of a generation mode: t2i_accuracy_cfg -> fd_t2i_cfg."""
    return mode.replace("t2i_accuracy", "fd_t2i")


def accuracy(pixels, scenes: list) -> float:
    """The share of images the detector reads as showing their scene's objects (colour and
    shape): what its caption says, or for a named scene what the name stands for."""
    return float(np.mean([detector.image_matches(im, shapes_caption(p.meta["objects"]))
                          for im, p in zip(pixels, scenes)]))


def image_nll(model: tasks.Model, text_ids: list, codes, retrieved=None) -> float:
    """Mean nats per image token of the true images given their captions (and `retrieved`
    documents in front): whether a model uses what it retrieves, without sampling noise."""
    logp = tasks.image_logprobs(model, text_ids, list(codes), retrieved)
    return float(-logp.mean() / np.asarray(codes).shape[-1])


def final_eval_loss(rows: list[dict]) -> float | None:
    """The last held-out loss of a run's metrics rows (None: it measured none)."""
    return next((r["eval_loss"] for r in reversed(rows) if r.get("eval_loss") is not None),
                None)


def chance() -> float:
    return 1.0 / (len(COLOURS) * len(SHAPES))


def _neighbors(cfg: Config, log) -> None:
    m = neighbors.compute_neighbors(cfg)
    log(f"demo: neighbors: {m['fill']:.1%} of documents have data.k={m['k']}; distinct "
        f"neighbors per document {m['k_histogram']}")
    warning = neighbors.fill_warning(m, cfg.retrieval.min_fill)
    if warning:
        log(warning)


def is_trained(cfg: Config, run: RunDir) -> bool:
    """Whether `run` holds the checkpoint of `cfg`'s last step."""
    if not run.checkpoints.exists():
        return False
    mngr = checkpoint.manager(run.checkpoints, cfg.train.keep_checkpoints)
    step = mngr.latest_step()
    mngr.close()
    return step == cfg.train.steps


def train_to_end(cfg: Config, root: storage.PathLike) -> None:
    """`train` (resuming a half-done run), or an error when a preemption stopped it: the run
    is checkpointed where it stopped, and scoring it there would report a model that was
    never trained to `train.steps`."""
    stopped = train(cfg, root).preempted_at
    if stopped is not None and stopped < cfg.train.steps:
        raise RuntimeError(f"{root}: training stopped at step {stopped} of {cfg.train.steps} "
                           "(SIGTERM); its checkpoint is saved: run the same command again to "
                           "resume it")


def _train_logged(cfg: Config, root: str, log_file: str) -> None:
    """A child process's work: `train_to_end`, with everything it prints going to
    `log_file`."""
    f = open(log_file, "a", buffering=1)
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f
    train_to_end(cfg, root)


def train_with_baseline(cfg: Config, out: DemoDir, log=print) -> None:
    """Train the run and (demo.baseline) the no-retrieval baseline at the same time, the
    baseline in a child process: on a 2-core CPU two trainings of this size get 1.14-1.21x
    the steps of one done (the small matmuls leave XLA's threads idle part of the time),
    and the same seeds give the same run either way. Each run not yet trained is trained (or
    resumed); a failed or interrupted baseline stops the stage."""
    base, brun = with_k(cfg, 0), out.ablation_run(0)
    child = None
    if has_baseline(cfg) and not is_trained(base, brun):
        brun.root.mkdir(parents=True, exist_ok=True)
        log_file = (tempfile.mkstemp(prefix="cm3leon-baseline-", suffix=".log")[1]
                    if storage.is_remote(brun.root) else str(brun.root / "train.log"))
        child = multiprocessing.get_context("spawn").Process(
            target=_train_logged, args=(base, str(brun.root), log_file), name="baseline")
        child.start()
        log(f"demo: training the no-retrieval baseline (data.k=0) beside the run -> "
            f"{brun.root}, log {log_file}")
    try:
        if not is_trained(cfg, out.run):
            train_to_end(cfg, out.run.root)
    except BaseException:
        if child is not None:
            child.terminate()
            child.join()
        raise
    if child is not None:
        child.join()
        if child.exitcode != 0:
            tail = "".join(open(log_file).readlines()[-20:])
            raise RuntimeError(f"the no-retrieval baseline's training (data.k=0, "
                               f"{brun.root}) exited with {child.exitcode}; the end of its log "
                               f"{log_file}:\n{tail}")


def run_stages(cfg: Config, out: DemoDir, log=print, with_train: bool = True
               ) -> tuple[dict, dict]:
    """The package's image tokenizer (trained once, when the demo uses it), prepare,
    retrieval encoder, index, neighbors and (`with_train`) train; returns
    ({stage: "ran"|"reused"}, {stage: wall minutes})."""
    done, minutes = {}, {}
    rdir = retrieval_dir(cfg)
    checks = {
        "prepare": DataDir(cfg.data.dir).manifest.exists,
        "heldout": DataDir(cfg.train.eval_dir).manifest.exists,
        "encoder": (rdir.encoder / train_encoder.INFO).exists,
        "index": (rdir.index / index_lib.MANIFEST).exists,
        "neighbors": lambda: neighbors.table_is_current(cfg),
    }
    actions = {
        "prepare": lambda: prepare(cfg),
        "heldout": lambda: prepare(heldout_config(cfg)),
        "encoder": lambda: train_encoder.train_encoder(cfg, cfg.data.dir, rdir.encoder),
        "index": lambda: neighbors.build_bank_index(cfg),
        "neighbors": lambda: _neighbors(cfg, log),
    }
    if uses_packaged(cfg):  # first, so that prepare finds it
        checks = {"image_tokenizer": pretrained.is_built, **checks}
        actions = {"image_tokenizer": lambda: pretrained.build(cfg, out.tokenizer_build,
                                                               log=log), **actions}
    if with_train:
        base = with_k(cfg, 0)
        checks["train"] = lambda: is_trained(cfg, out.run) and (
            not has_baseline(cfg) or is_trained(base, out.ablation_run(0)))
        actions["train"] = lambda: train_with_baseline(cfg, out, log)
    for stage, action in actions.items():
        t0 = time.perf_counter()
        reuse = checks[stage]()
        log(f"demo: {stage} {'reused' if reuse else 'running'}")
        if not reuse:
            action()
        done[stage] = "reused" if reuse else "ran"
        minutes[stage] = round((time.perf_counter() - t0) / 60, 2)
    return done, minutes


def evaluate(cfg: Config, out: DemoDir, log=print) -> dict:
    """Generate for held-out scenes in every mode, score from pixels, save sample grids."""
    _, model, toks, step = tasks.load_model(out.run.root)
    text_tok, image_tok = toks.text, toks.image
    n_tokens = image_tok.tokens_per_image
    source = held_out_source(cfg, image_tok.resolution)
    scenes = [source[i] for i in range(cfg.source.size, len(source))]
    captions = [p.caption for p in scenes]
    text_ids = [model.vocab.text_ids(text_tok.encode(c)) for c in captions]
    retrieved = (Retriever(cfg).documents(captions, text_ids, cfg.data.k) if cfg.data.k
                 else [[] for _ in text_ids])  # k = 0: the retrieval modes equal the others
    g = dataclasses.replace(cfg.generate, candidates=1)
    scores, images = {}, {}
    encoder = train_encoder.load_encoder(retrieval_dir(cfg).encoder, cfg.retrieval.embed_batch)
    if len(scenes) <= encoder.dim:
        log(f"demo: warning: {len(scenes)} scenes in {encoder.dim} dimensions make a "
            "rank-deficient covariance: fd_* are unstable; raise demo.eval_scenes")
    truth = fid.statistics(encoder.embed_images(np.stack([p.image for p in scenes])))
    fd = lambda pixels: fid.frechet_distance(*fid.statistics(encoder.embed_images(pixels)),
                                             *truth)
    for key, (guided, retrieval) in MODES.items():
        gk = dataclasses.replace(g, cfg_scale=g.cfg_scale if guided else 1.0)
        codes = tasks.text_to_image(model, text_ids, n_tokens, gk,
                                    retrieved=retrieved if retrieval else None)
        pixels = image_tok.decode(codes.reshape(-1, n_tokens))
        images[key] = pixels
        scores[key] = accuracy(pixels, scenes)
        scores[fd_key(key)] = fd(pixels)
        log(f"demo: {key} = {scores[key]:.3f}, {fd_key(key)} = {scores[fd_key(key)]:.3f}")
    m = cfg.demo.rerank_samples
    if m > 1:  # the paper's decoding: M samples with CFG, the best by image-text similarity
        codes = tasks.text_to_image(model, text_ids, n_tokens, dataclasses.replace(g, candidates=m))
        groups = image_tok.decode(codes.reshape(-1, n_tokens)).reshape(
            len(scenes), m, *scenes[0].image.shape)
        queries = [{"text": t, "caption": c, "image": []} for t, c in zip(text_ids, captions)]
        best, _ = rerank(list(groups), queries, dual_scorer(encoder))
        images[RERANKED] = groups[np.arange(len(scenes)), best[:, 0]]
        scores[RERANKED] = accuracy(images[RERANKED], scenes)
        scores[fd_key(RERANKED)] = fd(images[RERANKED])
        log(f"demo: {RERANKED} = {scores[RERANKED]:.3f} (best of {m})")
    truth_codes = image_tok.encode(np.stack([p.image for p in scenes]))
    scores["image_nll"] = image_nll(model, text_ids, truth_codes)
    scores["image_nll_retrieval"] = (image_nll(model, text_ids, truth_codes, retrieved)
                                     if cfg.data.k else scores["image_nll"])
    log(f"demo: image_nll = {scores['image_nll']:.4f} without retrieved documents, "
        f"{scores['image_nll_retrieval']:.4f} with")
    ids = tasks.image_to_text(model, list(truth_codes), g)
    generated = [text_tok.decode(model.vocab.to_piece_ids(i)) for i in ids]
    scores["caption_accuracy"] = float(np.mean([
        detector.caption_matches(source.describe(t), p.meta["objects"])
        for t, p in zip(generated, scenes)]))
    scores["detector_on_truth"] = accuracy([p.image for p in scenes], scenes)
    reconstructions = image_tok.decode(truth_codes)
    scores["detector_on_reconstructions"] = accuracy(reconstructions, scenes)
    scores["fd_reconstructions"] = fd(reconstructions)  # the image tokenizer's floor
    log(f"demo: caption_accuracy = {scores['caption_accuracy']:.3f}")
    if has_baseline(cfg):
        scores.update(evaluate_baseline(out, text_ids, scenes, truth_codes, g, log))
    rows = min(cfg.demo.grid_rows, len(scenes))
    columns = [np.stack([p.image for p in scenes[:rows]])] + [v[:rows] for v in images.values()]
    grid = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    save_image(out.samples_png, image_grid(grid, len(columns)))
    examples = [{"caption": c, "retrieved": [text_tok.decode(model.vocab.to_piece_ids(
                    d[model.vocab.is_text(d)])) for d in r],
                 "generated_caption": t} for c, r, t in zip(captions[:rows], retrieved, generated)]
    return {"step": step, "scores": scores, "examples": examples, "eval_scenes": len(scenes)}


BASELINE_MODES = ("t2i_accuracy", "t2i_accuracy_cfg")  # the baseline has no retrieval to use


def evaluate_baseline(out: DemoDir, text_ids: list, scenes: list, truth: np.ndarray,
                      g, log=print) -> dict:
    """The k = 0 run's text -> image accuracy without and with CFG on the same scenes (the
    caption ids and true image codes of the main run's tokenizers, which it shares), and its
    image NLL: `<mode>_no_retrieval_training` keys."""
    _, model, toks, _ = tasks.load_model(out.ablation_run(0).root)
    n_tokens = toks.image.tokens_per_image
    scores = {}
    for key in BASELINE_MODES:
        guided = MODES[key][0]
        gk = dataclasses.replace(g, cfg_scale=g.cfg_scale if guided else 1.0)
        codes = tasks.text_to_image(model, text_ids, n_tokens, gk)
        scores[f"{key}_no_retrieval_training"] = accuracy(
            toks.image.decode(codes.reshape(-1, n_tokens)), scenes)
    scores["image_nll_no_retrieval_training"] = image_nll(model, text_ids, truth)
    log("demo: trained without retrieval: " + ", ".join(f"{k} = {v:.3f}"
                                                         for k, v in scores.items()))
    return scores


def plot_loss(run: storage.Path, out: storage.Path) -> list[dict]:
    rows = read_metrics(run)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key in ("loss", "text_loss", "image_loss", "eval_loss"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label="held-out loss" if key == "eval_loss" else key,
                    **({"marker": "o", "color": "black"} if key == "eval_loss" else {}))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    with out.open("wb") as f:
        fig.savefig(f, format="png")
    return rows


def write_report(out: DemoDir, cfg: Config, result: dict, stages: dict, stage_minutes: dict,
                 minutes: float, losses: list[dict]) -> dict:
    s = result["scores"]
    report = {**{k: round(v, 4) for k, v in s.items()}, "chance": round(chance(), 4),
              "minutes": round(minutes, 2), "eval_scenes": result["eval_scenes"],
              "train_steps": result["step"], "cfg_scale": cfg.generate.cfg_scale,
              "retrieved_k": cfg.data.k, "stages": stages, "stage_minutes": stage_minutes,
              "final_loss": losses[-1]["loss"] if losses else None,
              "final_eval_loss": final_eval_loss(losses)}
    if has_baseline(cfg):
        report["final_eval_loss_no_retrieval_training"] = final_eval_loss(
            read_metrics(out.ablation_run(0).root))
    out.report_json.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# cm3leon demo", "",
        f"Shapes data ({cfg.source.size} scenes, up to {cfg.source.max_objects} object(s)); "
        f"{result['step']} training steps; evaluated on {result['eval_scenes']} held-out "
        f"scenes; {minutes:.1f} minutes wall (stages: "
        + ", ".join(f"{k} {v} {stage_minutes[k]:.1f} min" for k, v in stages.items()) + ").",
        "",
        "| score | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in report.items() if isinstance(v, float)], "",
        f"Chance = 1 / (colours x shapes). CFG scale {cfg.generate.cfg_scale}; retrieval puts "
        f"the index's {cfg.data.k} nearest documents to the caption in front of the prompt; "
        f"`{RERANKED}`: {cfg.demo.rerank_samples} samples with CFG per caption, the one the "
        "run's retrieval dual encoder scores closest to the caption kept (CM3Leon's Table 1 "
        "decoding: 8 samples, best by CLIP). `*_no_retrieval_training`: the same model "
        "trained on the same rows and steps without retrieved documents (demo.baseline). "
        "`image_nll*`: nats per image token of the true images given their captions (and "
        "the retrieved documents): whether a model uses what it retrieves.",
        "`fd_*`: Fréchet distance (FID's formula) between the generated and the true held-out "
        "images in the image space of the run's retrieval dual encoder (lower is better; "
        "`fd_reconstructions` is the image tokenizer's floor). No Inception weights ship, "
        "and ImageNet features of 32x32 shapes would say little; `cm3leon eval t2i` gives "
        "FID on real data.",
        "", f"Held-out loss (`final_eval_loss`): {cfg.demo.heldout_docs} scenes of another "
        "seed, without retrieved documents (they have no neighbors table).",
        "", "![loss](loss.png)", "",
        "Samples (`samples.png`): columns = truth, then "
        + ", ".join(k for k in (*MODES, RERANKED) if k in s) + ".", "",
        "![samples](samples.png)", "", "| caption | generated caption (from the true image) |",
        "|---|---|", *[f"| {e['caption']} | {e['generated_caption']} |"
                       for e in result["examples"]], ""]
    out.report_md.write_text("\n".join(lines))
    return report


def demo(config_path: storage.PathLike, workdir: storage.PathLike, overrides=(),
         log=print) -> dict:
    """Run (or resume) every stage and write the report; returns report.json's content."""
    t0 = time.perf_counter()
    out = DemoDir(workdir)
    out.root.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(config_path, out.root, overrides)
    if cfg.source.kind != "shapes":
        raise ValueError(f"source.kind={cfg.source.kind!r}: the demo scores shapes scenes only")
    stages, stage_minutes = run_stages(cfg, out, log)
    losses = plot_loss(out.run.root, out.loss_png)
    saved = out.evaluation
    t_eval = time.perf_counter()
    result = json.loads(saved.read_text()) if saved.exists() else None
    reuse = result is not None and result["digest"] == cfg.digest()
    log(f"demo: evaluate {'reused' if reuse else 'running'}")
    if not reuse:
        result = {"digest": cfg.digest(), **evaluate(cfg, out, log)}
        saved.write_text(json.dumps(result, indent=1) + "\n")
    stages["evaluate"] = "reused" if reuse else "ran"
    stage_minutes["evaluate"] = round((time.perf_counter() - t_eval) / 60, 2)
    report = write_report(out, cfg, result, stages, stage_minutes,
                          (time.perf_counter() - t0) / 60, losses)
    log(f"demo: {json.dumps({k: v for k, v in report.items() if k != 'stages'})}")
    log(f"demo: wrote {out.report_md}")
    return report
