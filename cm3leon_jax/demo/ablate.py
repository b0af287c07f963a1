"""`cm3leon ablate-retrieval`: does retrieval pay for its tokens? (issue 24)

The demo's flow (data, held-out documents, dual encoder, index, neighbors, its own run),
then the same model trained again with other `data.k` (retrieved documents per training
row) for the same steps of the same rows — the same token slots, packed, so the same real
tokens but for a little padding (`real_token_share` says how much is real) — each run
under DIR/ablation/k{K} (the demo's own `data.k` is the demo's run, not trained twice).
Every run is scored on the same held-out items with 0..K documents retrieved at inference
(the demo's query: the caption's text, the index's nearest documents, placed in front of
the prompt as in training), with and without CFG: accuracy ± its standard error
sqrt(p (1 - p) / n), read from pixels by the source's judge — the shapes detector for
shapes scenes, for Fashion-MNIST a classifier trained on the training split
(eval/classifier.py, kept in DIR/ablation/classifier); the judge's accuracy on the true
items and on the tokenizer's reconstructions is the ceiling beside them. Next to it, the
held-out loss of each run and how much the generated images copy their retrieved ones (the
share of image tokens equal to the closest retrieved image's, position by position; the
true items' own share is the baseline). Written as ablation.json, ablation.md and
ablation.png; finished runs and scores are reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.data.sources import FASHION_MNIST_CLASSES, fit_image, open_source
from cm3leon_jax.demo import job
from cm3leon_jax.eval import classifier
from cm3leon_jax.generate import tasks
from cm3leon_jax.layout import DataDir, DemoDir, RunDir
from cm3leon_jax.retrieval.query import Retriever
from cm3leon_jax.tokenizers.image import ImageTokenizer
from cm3leon_jax.train.metrics import read_metrics

COPIED = 0.9  # a generated image "copies" when this share of its tokens equals a retrieved one
CLASSIFIER_STEPS = 1500  # x 64 images: ~1.6 epochs of Fashion-MNIST, ~0.9 test accuracy


@dataclasses.dataclass(frozen=True)
class Judge:
    """What reads a generated image as right for its prompt, and how often chance would."""
    name: str
    accuracy: Callable[[np.ndarray, list], float]  # (uint8 pixels, held-out items) -> share
    chance: float


def judge_for(cfg: Config, out: DemoDir, resolution: int, log) -> Judge:
    """The shapes detector, or the Fashion-MNIST classifier (trained once, then reused)."""
    if cfg.source.kind == "shapes":
        return Judge("detector", job.accuracy, job.chance())
    where = out.ablation / "classifier"
    if classifier.saved(where):
        clf, _ = classifier.load(where)
    else:
        train = open_source(dataclasses.replace(cfg.source, split="train", size=None),
                            resolution)
        log(f"ablate: training the judge, a classifier on {len(train)} training images")
        pairs = [train[i] for i in range(len(train))]
        images = np.stack([fit_image(p.image, resolution) for p in pairs])
        labels = np.array([p.meta["label"] for p in pairs], np.int32)
        clf = classifier.train_classifier(images, labels, len(FASHION_MNIST_CLASSES),
                                          steps=CLASSIFIER_STEPS)
        classifier.save(clf, where, {"train_images": len(train), "steps": CLASSIFIER_STEPS})
    return Judge("classifier", lambda pixels, items: clf.accuracy(
        pixels, [p.meta["label"] for p in items]), 1 / len(FASHION_MNIST_CLASSES))


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def copied_share(codes: np.ndarray, retrieved: list[np.ndarray]) -> float:
    """The largest share of positions where `codes` equals a retrieved image's codes."""
    return max((float(np.mean(codes == r)) for r in retrieved if r.shape == codes.shape),
               default=0.0)


def check_ks(train_ks: list[int], infer_ks: list[int], cfg: Config) -> None:
    for name, ks in (("--train-k", train_ks), ("--infer-k", infer_ks)):
        if not ks or any(k < 0 for k in ks) or len(set(ks)) != len(ks):
            raise ConfigError(f"{name} {ks}: give distinct numbers of documents >= 0, e.g. 0,1,2")
    top = max(*train_ks, *infer_ks)
    if top > cfg.retrieval.pool:
        raise ConfigError(f"{top} documents exceed retrieval.pool={cfg.retrieval.pool}, the "
                          "neighbors kept per document; raise retrieval.pool")


def run_for(cfg: Config, out: DemoDir, k: int) -> RunDir:
    return out.run if k == cfg.data.k else out.ablation_run(k)


def score_run(cfg: Config, run: RunDir, infer_ks: list[int], judge: Judge, log) -> dict:
    """{mode: score} of one trained run: accuracy, its standard error and the copy
    figures per (documents at inference, CFG)."""
    _, model, toks, step = tasks.load_model(run.root)
    n_tokens = toks.image.tokens_per_image
    scenes = job.held_out(cfg, toks.image.resolution)
    captions = [p.caption for p in scenes]
    text_ids = [model.vocab.text_ids(toks.text.encode(c)) for c in captions]
    truth = toks.image.encode(np.stack([p.image for p in scenes]))
    retriever = Retriever(cfg) if any(infer_ks) else None
    out = {"step": step}
    for k in infer_ks:
        docs = (retriever.documents(captions, text_ids, k) if k else [[] for _ in captions])
        images = [[model.vocab.to_codes(d[model.vocab.is_image(d)]) for d in row]
                  for row in docs]
        out[f"image_nll_k{k}"] = job.image_nll(model, text_ids, truth, docs if k else None)
        if k:
            out[f"truth_copied_share_k{k}"] = float(np.mean(
                [copied_share(t, r) for t, r in zip(truth, images)]))
        for guided in (False, True):
            g = dataclasses.replace(cfg.generate, candidates=1,
                                    cfg_scale=cfg.generate.cfg_scale if guided else 1.0)
            codes = tasks.text_to_image(model, text_ids, n_tokens, g,
                                        retrieved=docs if k else None).reshape(-1, n_tokens)
            pixels = toks.image.decode(codes)
            acc = judge.accuracy(pixels, scenes)
            mode = f"k{k}" + ("_cfg" if guided else "")
            out[mode] = {"accuracy": acc, "se": standard_error(acc, len(scenes))}
            if k:
                shares = [copied_share(c, r) for c, r in zip(codes, images)]
                out[mode].update(copied_share=float(np.mean(shares)),
                                 copied=float(np.mean(np.asarray(shares) >= COPIED)))
            log(f"ablate: {run.root.name}: {k} retrieved, CFG {'on' if guided else 'off'}: "
                f"{acc:.3f} ± {out[mode]['se']:.3f}")
    rows = read_metrics(run.root)
    out["eval_loss"] = job.final_eval_loss(rows)
    slots = cfg.train.batch_size * cfg.data.seq_len
    out["real_token_share"] = float(np.mean([r["real_tokens"] / slots for r in rows]))
    return out


def _modes(result: dict) -> list[str]:
    """The scored modes (k0, k0_cfg, ...), in the order of the first run's scores."""
    first = next(iter(result["runs"].values()))
    return [m for m, v in first.items() if isinstance(v, dict)]


def plot(result: dict, path: storage.Path) -> None:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    runs, modes = list(result["runs"]), _modes(result)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        scores = result["runs"][run]
        ax.bar(np.arange(len(modes)) + i * width, [scores[m]["accuracy"] for m in modes], width,
               yerr=[scores[m]["se"] for m in modes], capsize=2, label=f"trained {run}")
    ax.axhline(result["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xticks(np.arange(len(modes)) + width * (len(runs) - 1) / 2,
                  [m.replace("_cfg", "\n+CFG").replace("k", "infer k=") for m in modes])
    ax.set_ylabel(f"text->image accuracy ({result['judge']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png")


def markdown(result: dict) -> str:
    runs, modes = result["runs"], _modes(result)
    lines = ["# Retrieval ablation", "",
             f"{result['eval_scenes']} held-out items of `{result['source']}`, "
             f"{result['steps']} steps of {result['rows']} rows x {result['seq_len']} tokens "
             f"per run. Accuracy ± standard error, read by the {result['judge']} (chance "
             f"{result['chance']:.3f}; on the true images {result['judge_on_truth']:.3f}, on "
             f"the tokenizer's reconstructions {result['judge_on_reconstructions']:.3f}); "
             f"`copied`: share of generations with >= {COPIED:.0%} of their tokens equal to "
             "a retrieved image.", "",
             "| trained with | " + " | ".join(modes) + " | held-out loss | image NLL |",
             "|---|" + "---|" * (len(modes) + 2)]
    for run, s in runs.items():
        cells = [f"{s[m]['accuracy']:.3f} ± {s[m]['se']:.3f}"
                 + (f" (copied {s[m]['copied']:.2f})" if "copied" in s[m] else "")
                 for m in modes]
        loss = f"{s['eval_loss']:.4f}" if s["eval_loss"] is not None else "—"
        nll = " / ".join(f"{v:.3f}" for key, v in s.items() if key.startswith("image_nll_k"))
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {loss} | {nll} |")
    return "\n".join(lines + ["", "`image NLL`: nats per image token of the true held-out "
                              "images given their captions and 0 / 1 / ... documents retrieved "
                              "at inference (lower: the model uses what it retrieves).", "",
                              "![ablation](ablation.png)", ""])


def ablate(config_path: storage.PathLike, workdir: storage.PathLike, overrides=(),
           train_ks=(0, 1, 2), infer_ks=(0, 1, 2), log=print) -> dict:
    """Train (or reuse) a run per `train_ks`, score each per `infer_ks` with and without
    CFG; returns ablation.json's content."""
    out = DemoDir(workdir)
    out.root.mkdir(parents=True, exist_ok=True)
    base = job.demo_config(config_path, out.root, overrides)
    if base.source.kind not in job.HELD_OUT_KINDS:
        raise ConfigError(f"source.kind={base.source.kind!r}: the ablation reads generated "
                          f"images with a judge, which {' and '.join(job.HELD_OUT_KINDS)} "
                          "have (the shapes detector, a Fashion-MNIST classifier)")
    train_ks, infer_ks = list(train_ks), list(infer_ks)
    check_ks(train_ks, infer_ks, base)
    resolution = base.vqgan.resolution
    items = job.held_out(base, resolution)  # refuses a held-out split too small, before work
    job.run_stages(base, out, log, with_train=False)  # data, held-out documents, retrieval
    judge = judge_for(base, out, resolution, log)
    out.ablation.mkdir(parents=True, exist_ok=True)  # also when every run is the demo's
    saved = out.ablation / "ablation.json"
    result = json.loads(saved.read_text()) if saved.exists() else {"runs": {}}
    truth = np.stack([p.image for p in items])
    tokenizer = ImageTokenizer.load(DataDir(base.data.dir).image_tokenizer)
    result.update(source=base.source.kind, judge=judge.name, chance=judge.chance,
                  judge_on_truth=judge.accuracy(truth, items),
                  judge_on_reconstructions=judge.accuracy(
                      tokenizer.decode(tokenizer.encode(truth)), items),
                  eval_scenes=len(items), steps=base.train.steps,
                  rows=base.train.batch_size, seq_len=base.data.seq_len)
    for k in train_ks:
        cfg = job.with_k(base, k)
        run = run_for(base, out, k)
        if not job.is_trained(cfg, run):
            log(f"ablate: training with data.k={k} -> {run.root}")
            job.train_to_end(cfg, run.root)
        key = f"k={k}"
        digest = f"{cfg.digest()}:{infer_ks}"
        if result["runs"].get(key, {}).get("digest") != digest:
            result["runs"][key] = {"digest": digest,
                                   **score_run(cfg, run, infer_ks, judge, log)}
            saved.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.ablation / "ablation.png")
    (out.ablation / "ablation.md").write_text(markdown(result))
    log(f"ablate: wrote {out.ablation / 'ablation.md'}")
    return result
