"""Multi-process start-up: `jax.distributed.initialize` from the environment, the checks
that every process runs the same job on a topology that fits it, and the topology log line.

Which processes form the job is a property of the launch, not of the config (the config
must hash the same on every process), so it comes from the environment:

- `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`: explicit
  (`launch/local.sh` sets them);
- inside `srun` with more than one task: SLURM's variables, detected by JAX;
- `CM3LEON_DISTRIBUTED=1`: call `jax.distributed.initialize()` with no arguments and let
  JAX detect the cluster (TPU pod slices, `launch/tpu_pod.sh`); `CM3LEON_DISTRIBUTED=0`
  never initializes.
Without any of these the job is a single process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.parallel.mesh import batch_sharding

ENV_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(name: str, env) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r}: expected an integer") from None


def launch_mode(env=os.environ) -> str:
    """'explicit', 'slurm', 'auto' (JAX detects the cluster) or 'single'."""
    flag = env.get("CM3LEON_DISTRIBUTED", "").lower()
    if flag not in ("", "0", "1", "off", "on", "auto"):
        raise ConfigError(f"environment CM3LEON_DISTRIBUTED={flag!r}: expected 0, 1 or auto")
    if flag in ("0", "off"):
        return "single"
    given = [k for k in ENV_EXPLICIT if env.get(k)]
    if given:
        missing = [k for k in ENV_EXPLICIT if not env.get(k)]
        if missing:
            raise ConfigError(f"environment sets {', '.join(given)} but not {', '.join(missing)}: "
                              "an explicit multi-process launch needs all three")
        return "explicit"
    if flag in ("1", "on"):
        return "auto"
    if env.get("SLURM_STEP_ID") is not None and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return "single"


def initialize(env=os.environ) -> str:
    """Join the multi-process job the environment describes (no-op for one process, or
    when already joined); returns the launch mode."""
    mode = launch_mode(env)
    if mode == "single" or jax.distributed.is_initialized():
        return mode
    if mode == "explicit":
        n, i = _int_env("JAX_NUM_PROCESSES", env), _int_env("JAX_PROCESS_ID", env)
        if not 0 <= i < n:
            raise ConfigError(f"environment JAX_PROCESS_ID={i} must be in [0, JAX_NUM_PROCESSES={n})")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                   process_id=i)
    else:
        jax.distributed.initialize()
    return mode


def topology() -> str:
    d = jax.devices()[0]
    return (f"process {jax.process_index()}/{jax.process_count()}: "
            f"{jax.local_device_count()} local of {jax.device_count()} {d.platform} devices "
            f"({d.device_kind})")


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_leaves(value, name + "."))
        else:
            out.append((name, value))
    return out


def check_same_config(cfg: Config) -> None:
    """Fail on every process, naming the first differing key, unless all processes
    resolved the same config. One small allgather; nothing for a single process."""
    if jax.process_count() == 1:
        return
    leaves = _leaves(cfg.to_dict())
    codes = np.asarray([int.from_bytes(hashlib.sha256(json.dumps(v).encode()).digest()[:4],
                                       "little") & 0x7FFFFFFF for _, v in leaves], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(codes))  # [processes, keys]
    differs = np.flatnonzero((everyone != everyone[0]).any(axis=0))
    if differs.size:
        k = int(differs[0])
        key, value = leaves[k]
        groups = sorted({int(p) for p in np.flatnonzero(everyone[:, k] == codes[k])})
        raise ConfigError(
            f"processes resolved different configs (hash {cfg.digest()} on process "
            f"{jax.process_index()}): {key}={value!r} here and on processes {groups}, "
            f"another value on processes "
            f"{sorted(set(range(jax.process_count())) - set(groups))}")


def check_batch_layout(cfg: Config, mesh, process_of=lambda device: device.process_index) -> None:
    """The data loader hands process p the contiguous rows [p*B/P, (p+1)*B/P) of each
    global batch; the mesh must put exactly those rows on p's devices. Checked for every
    process, so all fail alike. (`process_of` maps a device to its process.)"""
    B = cfg.train.batch_size
    index_map = batch_sharding(mesh).devices_indices_map((B, 1))
    P = len({process_of(d) for d in index_map})
    if B % P:
        raise ConfigError(f"train.batch_size={B} is not divisible by the {P} processes")
    local = B // P
    rows = {p: set() for p in range(P)}
    for device, index in index_map.items():
        rows[process_of(device)].update(range(*index[0].indices(B)))
    for p in range(P):
        if rows[p] != set(range(p * local, (p + 1) * local)):
            raise ConfigError(
                f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} x "
                f"tensor={mesh.shape['tensor']} puts {len(rows[p])} batch rows on process {p}, "
                f"but its data loader gives it rows {p * local}..{(p + 1) * local - 1} of "
                f"train.batch_size={B}: split the batch axes (mesh.data, mesh.fsdp) across "
                "processes, e.g. keep mesh.tensor within one process's devices")


def everyone(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def log(message: str) -> None:
    """Print once per job (process 0)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Preemption:
    """Turns SIGTERM into 'stop after this step' at the same step on every process.

    Multi-process: JAX's preemption sync manager (started by jax.distributed) catches the
    signal and agrees a step with every process. One process: a Python handler sets a flag,
    for Ctrl-C (SIGINT) too, so an interactive run keeps the steps since its last
    checkpoint; a second Ctrl-C raises KeyboardInterrupt at the next Python bytecode.
    (With `data.workers` > 0 a terminal's Ctrl-C also reaches grain's worker processes.)
    """
    requested: bool = False
    previous: Optional[dict] = None
    name: str = "SIGTERM"  # the signal that asked, for the message

    def install(self) -> None:
        if jax.process_count() == 1:
            self.previous = {sig: signal.signal(sig, self._handler)
                             for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name = True, signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        """Call at every step on every process; True when all must save and stop."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def uninstall(self) -> None:
        if jax.process_count() == 1 and self.previous:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
