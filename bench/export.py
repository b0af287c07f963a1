"""Time `cm3leon export` (both formats) and reading an export back, on a checkpoint of
random parameters of any config.

    python bench/export.py --config configs/tiny.yaml [section.key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from cm3leon_jax.config import load_config
from cm3leon_jax.data.pipeline import train_batches
from cm3leon_jax.export.write import export
from cm3leon_jax.parallel.mesh import make_mesh
from cm3leon_jax.train import checkpoint, weights
from cm3leon_jax.train.state import create_state, state_layout


def write_checkpoint(cfg, workdir: Path) -> int:
    """A run directory holding one checkpoint with random (std 0.02) parameters."""
    mesh = make_mesh(cfg.mesh)
    tx, mdef, shardings = state_layout(cfg, mesh)
    with jax.set_mesh(mesh):
        state = create_state(cfg, tx, shardings)
        leaves, tree = jax.tree.flatten(mdef.abstract_params)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        params = jax.jit(
            lambda ks: tree.unflatten([0.02 * jax.random.normal(k, a.shape, jnp.float32)
                                       for k, a in zip(ks, leaves)]),
            out_shardings=shardings.params)(keys)
    mngr = checkpoint.manager(workdir / "checkpoints", 1)
    checkpoint.save(mngr, 1, state.replace(params=params), train_batches(cfg), cfg)
    mngr.wait_until_finished()
    return sum(a.size for a in leaves)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n, t_ckpt = timed(lambda: write_checkpoint(cfg, tmp / "run"))
        _, t_restore = timed(lambda: jax.block_until_ready(weights.load(tmp / "run").params))
        st, t_st = timed(lambda: export(tmp / "run", tmp / "st", "safetensors"))
        _, t_opt = timed(lambda: export(tmp / "run", tmp / "opt", "hf-opt"))
        _, t_read = timed(lambda: jax.block_until_ready(weights.load(tmp / "st").params))
    mib = st["bytes"] / 2**20
    print(f"| params | file | write checkpoint | restore params | export safetensors "
          f"| export hf-opt | read export |\n|---|---|---|---|---|---|---|\n"
          f"| {n / 1e6:.1f}M | {mib:.0f} MiB | {t_ckpt:.1f} s | {t_restore:.1f} s | "
          f"{t_st:.1f} s ({mib / t_st:.0f} MiB/s) | {t_opt:.1f} s ({mib / t_opt:.0f} MiB/s) | "
          f"{t_read:.1f} s |")


if __name__ == "__main__":
    main()
