"""Time the real train step: compile once, warm up, then time N steps with device syncs.

    python bench/train_step.py --config configs/tiny.yaml [--steps 20] [section.key=value ...]

Prints step time, tokens/s (total and per device), MFU against the measured matmul peak of
this device and against the datasheet peak, peak device memory and compile time.
FLOPs per token: 6 x matmul parameters + causal attention at half the full T x T matrix
(MaxText's accounting since its PR #1988). Imports neither grain nor tensorflow, so it runs
on a bare GPU/TPU machine with only jax, flax, optax and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.parallel import mesh as mesh_lib  # noqa: E402
from cm3leon_jax.train.metrics import device_peak_tflops  # noqa: E402
from cm3leon_jax.train.state import create_state, state_layout  # noqa: E402
from cm3leon_jax.train.step import jit_train_step  # noqa: E402


def measured_matmul_tflops(dtype) -> float:
    """The best rate of a large square matmul on device 0 (the practical ceiling)."""
    n = 8192 if jax.devices()[0].platform != "cpu" else 1024
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def random_batch(cfg, rng) -> dict:
    """One full-length document per row; token ids uniform over the used vocabulary."""
    vocab = cfg.vocab.build()
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    tokens = rng.integers(0, vocab.used_size, (shape[0], shape[1] + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            "segment_ids": np.ones(shape, np.int32), "weights": np.ones(shape, np.float32)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--profile", metavar="DIR",
                   help="a jax.profiler trace of the timed steps into DIR (TensorBoard/XProf)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    mesh = mesh_lib.make_mesh(cfg.mesh)
    tx, mdef, shardings = state_layout(cfg, mesh)
    rng = np.random.default_rng(0)
    batches = [random_batch(cfg, rng) for _ in range(2)]

    with jax.set_mesh(mesh):
        state = create_state(cfg, tx, shardings)
        batches = [mesh_lib.global_batch(b, mesh) for b in batches]
        t = time.perf_counter()
        compiled = jit_train_step(cfg, mdef, tx, shardings, mesh).lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t
        for i in range(args.warmup):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(state)
        if args.profile:
            jax.profiler.start_trace(args.profile)
        t = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        step_s = (time.perf_counter() - t) / args.steps
        if args.profile:
            jax.profiler.stop_trace()

    n_dev = jax.device_count()
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = cfg.model.flops_per_token(cfg.vocab.build().size, cfg.data.seq_len)
    achieved = flops * tokens / step_s / n_dev / 1e12  # TFLOP/s per device
    measured = measured_matmul_tflops(jnp.dtype(cfg.model.dtype))
    datasheet = cfg.train.peak_tflops or device_peak_tflops()
    stats = jax.devices()[0].memory_stats() or {}
    mem = compiled.memory_analysis()
    report = {
        "config": args.config, "overrides": args.overrides,
        "device": f"{n_dev} x {jax.devices()[0].device_kind}",
        "params": cfg.model.param_counts(cfg.vocab.build().size)["total"],
        "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
        "compile_s": round(compile_s, 2), "step_s": step_s,
        "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / n_dev,
        "tflops_per_device": achieved,
        "measured_peak_tflops": measured, "mfu_measured": achieved / measured,
        "datasheet_peak_tflops": datasheet,
        "mfu_datasheet": achieved / datasheet if datasheet else None,
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        "compiled_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "loss": float(metrics["loss"]),
    }
    print(f"device            {report['device']}")
    print(f"model             {report['params'] / 1e6:.1f}M params, batch {cfg.train.batch_size} x "
          f"seq {cfg.data.seq_len}, {cfg.model.dtype}, remat {cfg.model.remat}")
    print(f"compile           {compile_s:.1f} s")
    print(f"step              {step_s * 1e3:.1f} ms (mean of {args.steps} after {args.warmup} warm-up)")
    print(f"tokens/s          {report['tokens_per_s']:,.0f} ({report['tokens_per_s_per_device']:,.0f} per device)")
    print(f"achieved          {achieved:.3f} TFLOP/s per device ({flops:.4g} FLOPs/token)")
    print(f"MFU (measured)    {report['mfu_measured']:.1%} of {measured:.1f} TFLOP/s matmul peak")
    if datasheet:
        print(f"MFU (datasheet)   {report['mfu_datasheet']:.1%} of {datasheet:.0f} TFLOP/s")
    else:
        print("MFU (datasheet)   n/a: no datasheet peak for this device (train.peak_tflops)")
    if report["peak_memory_bytes"]:
        print(f"peak memory       {report['peak_memory_bytes'] / 2**30:.2f} GiB")
    if report["compiled_temp_bytes"] is not None:
        print(f"compiled temp     {report['compiled_temp_bytes'] / 2**20:.1f} MiB")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
