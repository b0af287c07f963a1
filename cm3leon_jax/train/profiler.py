"""`train.profile_steps`: a `jax.profiler` trace of chosen training steps, for TensorBoard's
profile plugin or XProf (`tensorboard --logdir RUN/profile`).

Process 0 traces, from just before step `start` is dispatched until step `stop` has
finished on its devices (so the trace holds whole steps, and the last one's device time);
a resumed run past `start` traces the steps left. The trace goes to `RUN/profile/`
(`RunDir.profile`); for a run directory in a bucket it is written locally and uploaded when
the trace stops.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path as LocalPath

import jax

from cm3leon_jax import storage

class StepProfile:
    def __init__(self, steps: tuple[int, int] | None, dest: storage.Path, enabled: bool):
        self.steps = steps if enabled else None
        self.dest = dest
        self.local: LocalPath | None = None  # where the trace is being written; None: not

    def before(self, step: int) -> None:
        """Before step `step` is dispatched: start the trace at the first chosen step."""
        if self.steps is None or self.local is not None or not (
                self.steps[0] <= step <= self.steps[1]):
            return
        remote = storage.is_remote(self.dest)
        self.local = (LocalPath(tempfile.mkdtemp(prefix="cm3leon-profile-")) if remote
                      else storage.local(self.dest))
        jax.profiler.start_trace(str(self.local))

    def after(self, step: int, outputs) -> None:
        """After step `step` is dispatched (`outputs`: its results): at `stop`, wait for the
        devices and write the trace."""
        if self.local is not None and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stop and write the trace if one is running (also on a stop before `stop`)."""
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if storage.is_remote(self.dest):
            storage.copy(self.local, self.dest)
            shutil.rmtree(self.local)
        self.local, self.steps = None, None
