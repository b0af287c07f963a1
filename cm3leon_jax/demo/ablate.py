"""`cm3leon ablate-retrieval`: does retrieval pay for its tokens? (issue 24)

The demo's flow (data, held-out documents, dual encoder, index, neighbors, its own run),
then the same model trained again with other `data.k` (retrieved documents per training
row) for the same steps of the same rows — the same token slots, packed, so the same real
tokens but for a little padding (`real_token_share` says how much is real) — each run
under DIR/ablation/k{K} (the demo's own `data.k` is the demo's run, not trained twice).
Every run is scored on the same held-out scenes with 0..K documents retrieved at inference
(the demo's query: the caption's text, the index's nearest documents, placed in front of
the prompt as in training), with and without CFG, by the shapes detector: accuracy ± its
standard error sqrt(p (1 - p) / n). Next to it, the held-out loss of each run and how much
the generated images copy their retrieved ones (the share of image tokens equal to the
closest retrieved image's, position by position; the true scenes' own share is the
baseline). Written as ablation.json, ablation.md and ablation.png; finished runs and scores
are reused.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from matplotlib.figure import Figure

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.demo import job
from cm3leon_jax.generate import tasks
from cm3leon_jax.layout import DemoDir, RunDir
from cm3leon_jax.retrieval.query import Retriever
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.trainer import train

COPIED = 0.9  # a generated image "copies" when this share of its tokens equals a retrieved one


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


def score_run(cfg: Config, run: RunDir, infer_ks: list[int], log) -> dict:
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
            acc = job.accuracy(pixels, scenes)
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
    ax.set_ylabel("text->image accuracy (detector)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png")


def markdown(result: dict) -> str:
    runs, modes = result["runs"], _modes(result)
    lines = ["# Retrieval ablation", "",
             f"{result['eval_scenes']} held-out scenes, {result['steps']} steps of "
             f"{result['rows']} rows x {result['seq_len']} tokens per run; chance "
             f"{result['chance']:.3f}. Accuracy ± standard error; `copied`: share of "
             f"generations with >= {COPIED:.0%} of their tokens equal to a retrieved image.", "",
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
    if base.source.kind != "shapes":
        raise ConfigError(f"source.kind={base.source.kind!r}: the ablation scores generated "
                          "images with the shapes detector; only shapes data has one")
    train_ks, infer_ks = list(train_ks), list(infer_ks)
    check_ks(train_ks, infer_ks, base)
    job.run_stages(base, out, log, with_train=False)  # data, held-out documents, retrieval
    saved = out.ablation / "ablation.json"
    result = json.loads(saved.read_text()) if saved.exists() else {"runs": {}}
    result.update(chance=job.chance(), eval_scenes=base.demo.eval_scenes, steps=base.train.steps,
                  rows=base.train.batch_size, seq_len=base.data.seq_len)
    for k in train_ks:
        cfg = job.with_k(base, k)
        run = run_for(base, out, k)
        if not job.is_trained(cfg, run):
            log(f"ablate: training with data.k={k} -> {run.root}")
            train(cfg, run.root)  # resumes a half-done run
        key = f"k={k}"
        digest = f"{cfg.digest()}:{infer_ks}"
        if result["runs"].get(key, {}).get("digest") != digest:
            result["runs"][key] = {"digest": digest, **score_run(cfg, run, infer_ks, log)}
            saved.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.ablation / "ablation.png")
    (out.ablation / "ablation.md").write_text(markdown(result))
    log(f"ablate: wrote {out.ablation / 'ablation.md'}")
    return result
