"""`cm3leon eval-sft`: per-task scores of one or more runs on held-out SFT shapes examples.

Each run answers the same `sft.eval_examples` eval-split examples per task (sft/shapes_suite.py;
never training scenes) through the prompts of sft/prompts.py, and every answer is scored
from exact text or from the decoded pixels (shapes/scores.py). Two references
bracket the scores:

- chance: each example scored against the true answers of the other examples of its task
  (for VQA, of the same question kind): a well-formed answer that ignores the input.
- ceiling: for image tasks, the score of the true target after the image tokenizer's round
  trip (what a perfect model can reach through this tokenizer); 1 for text tasks.

Text answers are decoded greedily (exact-answer benchmarks are); images are sampled with the
`generate` section's settings and guidance scales.

Writes `eval_sft.json`, `eval_sft.md` (the table) and `eval_sft.png` (per image task:
condition (white for grounding), truth, then each run's image) under `--out` (local or
cloud storage, storage.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.generate import tasks
from cm3leon_jax.generate.grid import image_grid, save_image
from cm3leon_jax.sft.prompts import (answer_text, condition_image, instruction_prefix,
                                     target_image, task_prompt)
from cm3leon_jax.sft.shapes_suite import ShapesSFT
from cm3leon_jax.sft.tasks import SFTExample
from cm3leon_jax.shapes import scores
from cm3leon_jax.shapes.detector import caption_matches

OUTPUT = "eval_sft.json"
TEXT_TASKS = ("caption", "vqa")
SAMPLE_ROWS = 4  # examples per image task in eval_sft.png


def _caption_colour_shape(meta: dict, text: str) -> float:
    return float(caption_matches(text, meta["objects"]))


# Per task, its scores: (name, scorer(meta, answer)); the first is the task's own score.
METRICS = {
    "caption": (("caption", scores.score_caption),
                ("caption colour+shape", _caption_colour_shape)),  # the demo's caption score
    "vqa": (("vqa", scores.score_vqa),),
    "edit": (("edit", scores.score_edit),),
    "grounding": (("grounding", scores.score_grounding),),
    "control": (("control", scores.score_control),),
}


def score(example: SFTExample, output, metric: int = 0) -> float:
    """One answer's score (text for caption/vqa, uint8 pixels otherwise) under the task's
    `metric`-th scorer."""
    return METRICS[example.task][metric][1](example.meta, output)


def truth(example: SFTExample):
    return answer_text(example) if example.task in TEXT_TASKS else target_image(example)


def chance(examples: list[SFTExample], metric: int = 0) -> float:
    """Mean over examples of the mean score of the other examples' true answers."""
    per = []
    for i, e in enumerate(examples):
        others = [o for j, o in enumerate(examples) if j != i and
                  (e.task != "vqa" or o.meta["kind"] == e.meta["kind"])]
        if others:
            per.append(np.mean([score(e, truth(o), metric) for o in others]))
    return float(np.mean(per))


def ceiling(examples: list[SFTExample], image_tok, metric: int = 0) -> float:
    if examples[0].task in TEXT_TASKS:
        return 1.0
    targets = np.stack([target_image(e) for e in examples])
    rebuilt = image_tok.decode(image_tok.encode(targets))
    return float(np.mean([score(e, im, metric) for e, im in zip(examples, rebuilt)]))


def metrics(examples: dict) -> list[tuple[str, str, int]]:
    """(row name, task, metric index) of every score the table reports."""
    return [(name, t, m) for t in examples for m, (name, _) in enumerate(METRICS[t])]


def eval_examples(cfg: Config, resolution: int) -> dict[str, list[SFTExample]]:
    s = cfg.sft
    if s.source != "shapes":
        raise ConfigError("eval-sft scores the built-in shapes suite: set sft.source=shapes")
    suite = ShapesSFT(s.seed, resolution, s.max_objects)
    return {t: [suite.example(t, "eval", i) for i in range(s.eval_examples)] for t in s.tasks}


def answer(model, text_tok, image_tok, examples: list[SFTExample], g) -> list:
    """The run's answers (text or pixels) to one task's examples, decoded in one batch."""
    vocab = model.vocab
    asked = [task_prompt(e, text_tok.encode, image_tok.encode, vocab) for e in examples]
    if asked[0].kind == "text":  # exact answers are decoded greedily, as VQA evaluations do
        ids = tasks.complete_text(model, [a.streams[0] for a in asked],
                                  dataclasses.replace(g, temperature=0.0))
        return [text_tok.decode(vocab.to_piece_ids(i)) for i in ids]
    streams = [[a.streams[k] for a in asked] for k in range(len(asked[0].streams))]
    codes = tasks.image_from_streams(model, streams, image_tok.tokens_per_image, g)
    return list(image_tok.decode(codes))


def load(workdir: storage.PathLike):
    """(model, step, text tokenizer, image tokenizer) of a run directory or an export."""
    _, model, toks, step = tasks.load_model(workdir)
    return model, step, toks.text, toks.image


def evaluate(cfg: Config, workdirs: list[str], out: storage.PathLike, log=print) -> dict:
    """Score every run on every task; write the JSON, the Markdown table and the PNG."""
    runs = [(str(w), *load(w)) for w in workdirs]  # fail on a bad run before generating
    resolutions = {r[4].resolution for r in runs}
    if len(resolutions) != 1:
        raise ConfigError(f"eval-sft: the runs' image tokenizers differ in resolution "
                          f"({sorted(resolutions)}); compare runs that share a tokenizer")
    examples = eval_examples(cfg, resolutions.pop())
    result = {"examples_per_task": cfg.sft.eval_examples, "seed": cfg.sft.seed,
              "max_objects": cfg.sft.max_objects,
              "chance": {n: chance(examples[t], m) for n, t, m in metrics(examples)},
              "ceiling": {n: ceiling(examples[t], runs[0][4], m)
                          for n, t, m in metrics(examples)},
              "runs": {}, "samples": {t: [] for t in examples if t in TEXT_TASKS}}
    answers = {}
    bar = tqdm(total=len(runs) * len(examples), desc="eval-sft", unit="task")
    for name, model, step, text_tok, image_tok in runs:
        for task, ex in examples.items():
            bar.set_postfix(run=storage.path(name).name, task=task)
            answers[name, task] = answer(model, text_tok, image_tok, ex, cfg.generate)
            bar.update()
        scores = {n: float(np.mean([score(e, a, m) for e, a in zip(examples[t], answers[name, t])]))
                  for n, t, m in metrics(examples)}
        result["runs"][name] = {"step": step, "scores": scores}
    bar.close()
    for task, ex in examples.items():
        if task in TEXT_TASKS:
            result["samples"][task] = [
                {"prompt": instruction_prefix(e), "truth": truth(e),
                 **{name: answers[name, task][i] for name, *_ in runs}}
                for i, e in enumerate(ex[:SAMPLE_ROWS * 2])]
    out = storage.path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT).write_text(json.dumps(result, indent=1) + "\n")
    (out / "eval_sft.md").write_text(table(result) + "\n")
    write_samples(out / "eval_sft.png", examples, answers, [r[0] for r in runs])
    log(table(result))
    log(f"eval-sft: wrote {out / OUTPUT}, eval_sft.md, eval_sft.png")
    return result


def table(result: dict) -> str:
    names = list(result["runs"])
    head = "| score | " + " | ".join(f"{n} (step {result['runs'][n]['step']})" for n in names)
    lines = [head + " | chance | ceiling |", "|---" * (len(names) + 3) + "|"]
    for row in result["chance"]:
        cells = [f"{result['runs'][n]['scores'][row]:.3f}" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) +
                     f" | {result['chance'][row]:.3f} | {result['ceiling'][row]:.3f} |")
    return "\n".join(lines)


def write_samples(path: storage.Path, examples: dict, answers: dict, names: list[str]) -> None:
    rows = []
    for task, ex in examples.items():
        if task in TEXT_TASKS:
            continue
        for i, e in enumerate(ex[:SAMPLE_ROWS]):
            target = target_image(e)
            cond = condition_image(e)
            rows.append([np.full_like(target, 255) if cond is None else cond, target,
                         *[answers[n, task][i] for n in names]])
    if rows:
        images = np.stack([im for row in rows for im in row])
        save_image(path, image_grid(images, len(rows[0])))
