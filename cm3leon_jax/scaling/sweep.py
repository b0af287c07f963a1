"""`cm3leon sweep`: train every size of the plan on the same data, evaluating on the fixed
held-out set at each of its evaluation steps.

Each run is the trainer of `cm3leon train` (train/trainer.py) in its own work directory,
with a hook that measures the held-out loss at the run's evaluation steps, each of which is
also a checkpoint. An interrupted sweep resumes where it stopped: the trainer continues
from the latest checkpoint, and steps already in `eval.jsonl` are not evaluated again.
Layout of RUNS_DIR:

    sweep.yaml                the resolved sweep config (a resumed sweep must match it)
    <size>/run.json           parameters, FLOPs per token, budget, evaluation steps
    <size>/eval.jsonl         one line per evaluation: step, tokens, flops, grid, losses
    <size>/metrics.jsonl ...  what `cm3leon train` writes (checkpoints, tensorboard, config)

RUNS_DIR may be on cloud storage (storage.py), where eval.jsonl gets one rewrite per
evaluation (objects cannot be appended to; evaluations are few).
"""

from __future__ import annotations

import json
import time

import jax
import yaml
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError, from_dict
from cm3leon_jax.data.pipeline import check_inputs
from cm3leon_jax.layout import RunDir
from cm3leon_jax.scaling.plan import Run, plan
from cm3leon_jax.train import checkpoint
from cm3leon_jax.train.heldout import Evaluator, heldout_batches
from cm3leon_jax.train.trainer import Hook, train

SPEC = "sweep.yaml"
EVALS = "eval.jsonl"
RUN = "run.json"
RESUMABLE = ("mesh",)  # sections a resumed sweep may change (layout only)


def read_evals(run_dir: storage.PathLike) -> list[dict]:
    path = storage.path(run_dir) / EVALS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _check_same_sweep(cfg: Config, path: storage.Path) -> None:
    # through the loader, so a sweep written before a key was renamed compares by new names
    saved = json.loads(json.dumps(from_dict(yaml.safe_load(path.read_text()), saved=True)
                                  .to_dict()))
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as YAML reads them
    for section, values in current.items():
        if section in RESUMABLE:
            continue
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value:
                raise ConfigError(f"{path} was written with {section}.{key}={old!r} but the "
                                  f"config says {value!r}; use a new runs directory")


def evaluate_run(run: Run, run_dir: storage.Path, batches: list[dict],
                 lead: bool) -> tuple[list[dict], bool]:
    """Train `run` through its evaluation steps not yet in eval.jsonl, evaluating each on
    the way; returns the new records and whether SIGTERM stopped it."""
    done = {r["step"] for r in read_evals(run_dir)}
    todo = {p.step: p for p in run.evals if p.step not in done}
    if not todo:
        return [], False
    checkpoints = RunDir(run_dir).checkpoints
    if checkpoints.is_dir():
        with checkpoint.reader(checkpoints) as mngr:
            latest = mngr.latest_step() or 0
        missed = sorted(s for s in todo if s <= latest)
        if missed:
            raise ConfigError(f"{run_dir / EVALS} lacks steps {missed} but the run is at "
                              f"step {latest}; delete {run_dir} to redo this size")
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        (run_dir / RUN).write_text(json.dumps(run.summary(), indent=1) + "\n")
    evaluator = Evaluator(run.cfg, batches)
    records = []

    def evaluate(step, state):
        point = todo[step]
        losses = evaluator(state.params)
        record = {"step": step, "tokens": step * run.tokens_per_step,
                  "flops": step * run.flops_per_step, "grid": point.grid,
                  "params": run.params, **losses}
        records.append(record)
        if lead:
            storage.append_text(run_dir / EVALS, json.dumps(record) + "\n")
            print(f"{run.name} step {step}/{run.steps}: held-out loss "
                  f"{losses['loss']:.4f} (text {_fmt(losses['text_loss'])}, "
                  f"image {_fmt(losses['image_loss'])})")

    steps = frozenset(todo)
    result = train(run.cfg, run_dir, hooks=(Hook(evaluate, at=steps),), checkpoint_at=steps,
                   heldout_batches=batches)
    return records, result.preempted_at is not None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def sweep(cfg: Config, runs_dir: storage.PathLike) -> dict[str, list[dict]]:
    """Run (or finish) the whole sweep; returns each run's new evaluation records."""
    runs_dir = storage.path(runs_dir)
    lead = jax.process_index() == 0
    runs = plan(cfg)
    if cfg.data.dir is not None:  # both data directories are checked before any training
        check_inputs(cfg)
        if not storage.path(cfg.train.eval_dir).is_dir():
            raise FileNotFoundError(f"train.eval_dir={cfg.train.eval_dir!r} is not a directory")
    batches = heldout_batches(cfg, jax.process_index(), jax.process_count())
    spec = runs_dir / SPEC
    if spec.exists():
        _check_same_sweep(cfg, spec)
    elif lead:
        runs_dir.mkdir(parents=True, exist_ok=True)
        spec.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if lead:
        n = [r.params for r in runs]
        print(f"sweep: {len(runs)} sizes, {n[0]:,}..{n[-1]:,} non-embedding parameters "
              f"({n[-1] / n[0]:.0f}x), {cfg.sweep.tokens_per_param:g} tokens per parameter, "
              f"{sum(r.steps * r.flops_per_step for r in runs):.3g} training FLOPs in all")
    t0 = time.perf_counter()
    new = {}
    for run in tqdm(runs, desc="sweep", unit="size", disable=not lead):
        new[run.name], preempted = evaluate_run(run, runs_dir / run.name, batches, lead)
        if preempted:
            if lead:
                print(f"sweep stopped in {run.name} (SIGTERM); relaunch to resume")
            return new
    if lead:
        print(f"sweep done in {time.perf_counter() - t0:.0f}s: "
              + ", ".join(f"{r.name} {_fmt(_last_loss(runs_dir / r.name))}" for r in runs)
              + f"; fit with `cm3leon fit-scaling {runs_dir}`")
    return new


def _last_loss(run_dir: storage.Path) -> float | None:
    evals = read_evals(run_dir)
    return max(evals, key=lambda r: r["step"])["loss"] if evals else None
