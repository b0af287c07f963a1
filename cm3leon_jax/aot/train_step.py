"""`cm3leon compile`: compile the real train step for a TPU pod that is not attached, and
say whether it fits each chip's HBM and how fast the compiler thinks it will run.

The step is the one `cm3leon train` runs (`jit_train_step`: same shardings, donated state),
lowered from ShapeDtypeStructs only, so no parameter is ever materialised. libtpu compiles
it for compile-only devices of the named topology (see aot/topology.py); when the
program does not fit, the TPU compiler itself refuses it, as the pod would.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax

from cm3leon_jax.aot.compile import DoesNotFit, compile_or_explain, human_bytes
from cm3leon_jax.aot.topology import GiB, Topology
from cm3leon_jax.config import Config
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train.state import abstract_state, shard_bytes, state_layout
from cm3leon_jax.train.step import abstract_batch, jit_train_step


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: str
    device_kind: str
    chips: int
    mesh: dict  # axis -> size
    hbm_bytes: int  # per chip (datasheet)
    # per chip, from the shardings
    param_bytes: int
    optimizer_bytes: int  # optimizer state + step counter
    batch_bytes: int
    # per chip, from the compiler's memory analysis
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs
    temp_bytes: int  # activations and other temporaries
    code_bytes: int
    total_bytes: int  # argument + output - alias + temp + code
    fits: bool
    flops_per_chip: float  # the compiler's count (each loop body once, see below)
    model_flops_per_chip: float  # ModelConfig.flops_per_token x tokens / chips
    # The compiler's cost model counts each loop body (layer scan, gradient accumulation,
    # logits chunks) once, so its FLOPs and seconds describe one pass through each loop.
    compiler_seconds: float | None  # its time estimate for that (None when it gives none)
    mfu: float | None  # flops_per_chip / (compiler_seconds x chip peak)
    step_seconds: float | None  # model_flops_per_chip / (mfu x chip peak)
    peak_step_seconds: float  # model FLOPs / chip peak: the step time at 100% MFU
    tokens_per_step: int
    compile_seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def compile_train_step(cfg: Config, topology: Topology, devices=None) -> CompileReport:
    """Lower and compile the train step of `cfg` for `topology`; raises DoesNotFit."""
    devices = topology.devices() if devices is None else devices
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    tx, mdef, shardings = state_layout(cfg, mesh)
    state = abstract_state(cfg, tx, shardings)
    batch = abstract_batch(cfg, mesh)
    per_chip = {"param_bytes": shard_bytes(state.params),
                "optimizer_bytes": shard_bytes((state.step, state.opt_state)),
                "batch_bytes": shard_bytes(batch)}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jit_train_step(cfg, mdef, tx, shardings, mesh).lower(state, batch)
        compiled = compile_or_explain(
            lowered, lambda what, need, have: _advice(cfg, topology, dict(mesh.shape),
                                                      per_chip, what, need, have))
    compile_seconds = time.perf_counter() - start

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    chips = len(devices)
    model_flops = cfg.model.flops_per_token(cfg.vocab.build().size, cfg.data.seq_len) \
        * tokens / chips
    flops = float(cost.get("flops", 0.0))
    seconds = float(cost.get("optimal_seconds", 0.0))
    seconds = seconds if seconds > 0 and flops > 0 else None  # < 0: no estimate
    peak = topology.chip.peak_tflops * 1e12
    return CompileReport(
        topology=topology.name, device_kind=devices[0].device_kind, chips=chips,
        mesh=dict(mesh.shape), hbm_bytes=topology.chip.hbm_bytes, **per_chip,
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, total_bytes=total,
        fits=total <= topology.chip.hbm_bytes,
        flops_per_chip=flops, model_flops_per_chip=model_flops, compiler_seconds=seconds,
        mfu=flops / (seconds * peak) if seconds else None,
        step_seconds=model_flops * seconds / flops if seconds else None,
        peak_step_seconds=model_flops / peak,
        tokens_per_step=tokens, compile_seconds=compile_seconds)


def micro_batch_options(cfg: Config, data_chips: int) -> list[int]:
    """The train.grad_accum values that split the batch evenly over the data-parallel chips,
    largest micro-batch first."""
    b = cfg.train.batch_size
    return [g for g in range(1, b + 1) if b % g == 0 and (b // g) % data_chips == 0]


def largest_fitting_micro_batch(cfg: Config, topology: Topology, compile_fn=None,
                                progress=print) -> tuple[Config | None, list[tuple]]:
    """Binary search over `micro_batch_options` (memory grows with the micro-batch): the
    config with the smallest grad_accum whose step fits, or None, and every try as
    (grad_accum, sequences per chip, report or None when the compiler refused it)."""
    compile_fn = compile_fn or compile_train_step
    shape = cfg.mesh.shape(topology.num_chips)
    data_chips = shape[0] * shape[1]
    options = micro_batch_options(cfg, data_chips)
    tried, best = [], None
    lo, hi = 0, len(options) - 1  # options[hi]: the smallest micro-batch
    while lo <= hi:
        mid = (lo + hi) // 2
        g = options[mid]
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=g))
        rows = cfg.train.batch_size // g // data_chips
        try:
            report = compile_fn(c, topology)
        except DoesNotFit:
            report = None
        tried.append((g, rows, report))
        fits = report is not None and report.fits
        progress(f"train.grad_accum={g} ({rows} sequences per chip): "
                 + (f"{human_bytes(report.total_bytes)} per chip, fits" if fits else
                    "does not fit" if report is None else
                    f"{human_bytes(report.total_bytes)} per chip, does not fit"))
        if fits:
            best, hi = c, mid - 1
        else:
            lo = mid + 1
    return best, tried


def _advice(cfg: Config, topology: Topology, mesh: dict, per_chip: dict, what: str,
            need: int, have: int) -> str:
    """Name the overshoot and the knobs that reduce it."""
    state = per_chip["param_bytes"] + per_chip["optimizer_bytes"]
    t, m = cfg.train, cfg.model
    lines = [
        f"does not fit {topology.name}: {what} {need / GiB:.2f} GiB per chip, the chip has "
        f"{have / GiB:.2f} GiB of HBM (over by {(need - have) / GiB:.2f} GiB)",
        f"  per chip: parameters {per_chip['param_bytes'] / GiB:.2f} GiB, optimizer state "
        f"{per_chip['optimizer_bytes'] / GiB:.2f} GiB, batch {per_chip['batch_bytes'] / GiB:.3f}"
        f" GiB (mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']})",
        "  what would help:"]
    if state > have / 2:
        lines.append(
            f"  - shard the parameters and optimizer state over more chips: mesh.fsdp="
            f"{mesh['fsdp']} (move chips from mesh.data={mesh['data']}), mesh.tensor="
            f"{mesh['tensor']}, or a larger pod")
    if m.remat != "full":
        lines.append(f"  - model.remat=full (now {m.remat}): recompute activations in backward")
    rows = t.batch_size // t.grad_accum // (mesh["data"] * mesh["fsdp"])
    if rows > 1:
        # temporaries shrink about in proportion to the micro-batch
        room = max(have - state, have / 16)
        factor = min(2 ** max(math.ceil(math.log2(need / room)), 1), rows)
        lines.append(
            f"  - train.grad_accum={t.grad_accum * factor} (now {t.grad_accum}): micro-batches "
            f"of {rows // factor} instead of {rows} sequences per chip")
    if not m.logits_chunk and cfg.data.seq_len >= 512:
        lines.append(f"  - model.logits_chunk={min(1024, cfg.data.seq_len // 2)}: never hold "
                     "a whole [batch, seq, vocab] block of float32 logits")
    if mesh["tensor"] == 1:
        lines.append("  - mesh.tensor=2 or more: also splits the activations' heads, MLP and "
                     "vocab dimensions")
    return "\n".join(lines)


def fit_advice(cfg: Config, topology: Topology, r: CompileReport) -> str:
    """For a step that compiled but whose arguments + temporaries exceed the chip's HBM
    (libtpu checks the temporaries alone against it)."""
    per_chip = {k: getattr(r, k) for k in ("param_bytes", "optimizer_bytes", "batch_bytes")}
    return _advice(cfg, topology, r.mesh, per_chip, "the train step needs", r.total_bytes,
                   r.hbm_bytes)


def format_report(r: CompileReport, config_name: str) -> str:
    g = lambda b: f"{human_bytes(b):>11}"
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    mfu = (f"{100 * r.mfu:.1f}% (the compiler's FLOPs over its time estimate, for one pass "
           f"through each loop: {r.flops_per_chip:.4g} FLOPs in {r.compiler_seconds:.4g} s)"
           if r.mfu is not None else "n/a (no compiler estimate)")
    step = (f"{r.step_seconds:.4g} s at the compiler's utilisation, "
            f"{r.tokens_per_step / r.step_seconds:,.0f} tokens/s" if r.step_seconds
            else "none from the compiler")
    step += (f"; >= {r.peak_step_seconds:.4g} s at the chip's peak, "
             f"<= {r.tokens_per_step / r.peak_step_seconds:,.0f} tokens/s")
    return "\n".join([
        f"config              {config_name}",
        f"topology            {r.topology}: {r.chips} x {r.device_kind}, mesh {mesh}",
        f"per chip            HBM {human_bytes(r.hbm_bytes)}",
        f"  parameters        {g(r.param_bytes)}",
        f"  optimizer state   {g(r.optimizer_bytes)}",
        f"  batch             {g(r.batch_bytes)}",
        f"  activations+temp  {g(r.temp_bytes)}",
        f"  code              {g(r.code_bytes)}",
        f"  total             {g(r.total_bytes)}  ({100 * r.total_bytes / r.hbm_bytes:.1f}% of "
        f"HBM: {'fits' if r.fits else 'DOES NOT FIT'})",
        f"FLOPs per step      {r.model_flops_per_chip:.4g} per chip (6 x matmul params + "
        "attention, per token)",
        f"step time estimate  {step}",
        f"implied MFU         {mfu}",
        f"compiled in         {r.compile_seconds:.1f} s",
    ])
