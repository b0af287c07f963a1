"""`cm3leon sweep`: train a family of model sizes on the same data under one compute rule,
and record validation loss on a fixed held-out set as the FLOPs grow.

Budget rule: a model with N non-embedding parameters trains on `tokens_per_param * N`
tokens (tokens ∝ parameters, so compute C ∝ N²). Validation points lie on one grid of
training FLOPs shared by every size, `evals_per_decade` points per 10× (regular intervals
in log C, which is what a log–log fit needs) over the last decade of each run (warmup
and the first steps are no power law), plus the step where each run has seen as
many tokens as the smallest run's whole budget (for L(N) at fixed tokens), plus its last
step. Each size is an ordinary `cm3leon train` run directory, trained segment by segment
up to each validation step (the learning-rate schedule is fixed to the run's full length,
so segments equal one uninterrupted run); a sweep that is stopped resumes from the
checkpoints and `evals.jsonl` it finds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from cm3leon_jax.config import Config, ConfigError, save_config
from cm3leon_jax.model.size import flops_per_token, param_counts

EVALS = "evals.jsonl"
RUN_META = "sweep_run.json"
FIRST_EVAL_FRACTION = 10  # grid points start at 1/10 of a run (its last decade), after warmup


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    cfg: Config
    params: int  # non-embedding (layer) parameters
    total_params: int
    flops_per_token: float
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.data.seq_len

    def flops(self, step: int) -> float:
        return self.flops_per_token * self.tokens_per_step * step


def plan(cfg: Config) -> list[Run]:
    """One run config per size, with its step budget from the compute rule."""
    vocab_size = cfg.vocab.build().size
    runs = []
    for layers, width in cfg.sweep.model_sizes():
        model = dataclasses.replace(cfg.model, n_layers=layers, d_model=width,
                                    n_heads=width // cfg.sweep.head_dim, d_ff=4 * width)
        counts = param_counts(model, vocab_size)
        tokens = cfg.sweep.tokens_per_param * counts["layers"]
        steps = max(1, math.ceil(tokens / (cfg.train.batch_size * cfg.data.seq_len)))
        warmup = min(cfg.optimizer.warmup_steps, max(1, steps // 10))
        run_cfg = dataclasses.replace(
            cfg, model=model,
            optimizer=dataclasses.replace(cfg.optimizer, decay_steps=steps, warmup_steps=warmup),
            train=dataclasses.replace(cfg.train, steps=steps, checkpoint_every=steps))
        runs.append(Run(f"{layers}x{width}", run_cfg, counts["layers"], counts["total"],
                        flops_per_token(model, vocab_size, cfg.data.seq_len), steps))
    params = [r.params for r in runs]
    if len(set(params)) != len(params):
        raise ConfigError(f"sweep.sizes: two sizes have the same parameter count ({params})")
    return sorted(runs, key=lambda r: r.params)


def eval_steps(run: Run, fixed_tokens: int, per_decade: int) -> list[int]:
    """Steps of `run` to validate at: the shared log-FLOP grid (from the end of warmup or
    1/10 of the run on, whichever is later), the fixed-token step, the end."""
    steps = {run.steps, min(run.steps, max(1, round(fixed_tokens / run.tokens_per_step)))}
    first = max(1, run.cfg.optimizer.warmup_steps, run.steps // FIRST_EVAL_FRACTION)
    k = math.ceil(per_decade * math.log10(run.flops(first)))
    while 10 ** (k / per_decade) <= run.flops(run.steps):
        steps.add(max(1, round(10 ** (k / per_decade) / run.flops(1))))
        k += 1
    return sorted(steps)


def heldout_batch(cfg: Config) -> dict:
    """The fixed validation rows: synthetic rows far past any row a run trains on."""
    from cm3leon_jax.data.synthetic import synthetic_row

    vocab = cfg.vocab.build()
    rows = [synthetic_row(2**40 + i, cfg.data.seed, cfg.data.seq_len, vocab)
            for i in range(cfg.sweep.eval_rows)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def validate_losses(run: Run, workdir: Path, step: int, batch: dict) -> dict:
    """Validation cross-entropy (all, text, image targets) of checkpoint `step`."""
    from cm3leon_jax.export import source
    from cm3leon_jax.parallel import mesh as mesh_lib
    from cm3leon_jax.train.step import loss_sums

    weights = source.from_run(workdir, step)
    vocab = run.cfg.vocab.build()
    with jax.set_mesh(weights.mesh):
        sums = jax.jit(lambda p, b: loss_sums(weights.mdef.bind(p), b, vocab))(
            weights.params, mesh_lib.global_batch(batch, weights.mesh))
    sums = jax.device_get(sums)
    return {"loss": float(sums["ce"] / sums["w"]),
            "text_loss": float(sums["text_ce"] / max(sums["text_w"], 1.0)),
            "image_loss": float(sums["image_ce"] / max(sums["image_w"], 1.0))}


def read_evals(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / EVALS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sweep(cfg: Config, out: str | Path) -> list[dict]:
    """Train and validate every size (resuming what exists); returns all validation records."""
    from cm3leon_jax.train.loop import train

    if cfg.data.dir is not None:
        raise ConfigError("sweep: data.dir is set, but held-out sets are built only for the "
                          "synthetic source so far; leave data.dir null")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "sweep.yaml")
    runs = plan(cfg)
    fixed_tokens = runs[0].steps * runs[0].tokens_per_step
    batch = heldout_batch(cfg)
    lead = jax.process_index() == 0
    if lead:
        print(f"sweep: {len(runs)} sizes, {runs[0].params:,}..{runs[-1].params:,} non-embedding "
              f"parameters ({runs[-1].params / runs[0].params:.1f}x), "
              f"{sum(r.steps for r in runs):,} steps in all")
    records = []
    for run in runs:
        workdir = out / run.name
        workdir.mkdir(exist_ok=True)
        meta = {"name": run.name, "params": run.params, "total_params": run.total_params,
                "flops_per_token": run.flops_per_token, "steps": run.steps,
                "tokens_per_step": run.tokens_per_step, "fixed_tokens": fixed_tokens}
        if lead:
            (workdir / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")
        done = {r["step"]: r for r in read_evals(workdir)}
        for step in eval_steps(run, fixed_tokens, cfg.sweep.evals_per_decade):
            if step in done:
                records.append(done[step])
                continue
            train(dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train,
                                                                         steps=step)), workdir)
            record = {"run": run.name, "step": step, "params": run.params,
                      "tokens": step * run.tokens_per_step, "flops": run.flops(step),
                      **validate_losses(run, workdir, step, batch)}
            if lead:
                with open(workdir / EVALS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"sweep {run.name} step {step}/{run.steps}: validation loss "
                      f"{record['loss']:.4f} (text {record['text_loss']:.4f}, image "
                      f"{record['image_loss']:.4f}) at {record['flops']:.3g} FLOPs")
            records.append(record)
    return records
