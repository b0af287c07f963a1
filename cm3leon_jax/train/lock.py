"""One writer per run directory: a lock file that a second trainer is refused by.

Two trainers on one work directory interleave checkpoints and metrics (one dies inside
orbax's save, `metrics.jsonl` gets steps twice). Process 0 of a job creates `RUN/.lock`
exclusively (O_EXCL) with its host, pid and start time and removes it when the job ends;
a second job finds it and stops with the holder's identity. A lock left by a process that
died (kill -9) on this host is taken over; one from another host is reported with the
file to delete, since its process cannot be checked from here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from cm3leon_jax.config import ConfigError


class RunLocked(ConfigError):
    """Another trainer holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    def __init__(self, path: Path):
        self.path, self.held = path, False

    def acquire(self) -> "RunLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # the second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # its process died: stale
                    continue
                where = (f"host {holder.get('host')}, pid {holder.get('pid')}, since "
                         f"{holder.get('started')}" if holder else "unreadable lock")
                raise RunLocked(f"{self.path.parent} is being trained by another job ({where});"
                                f" one writer per run directory. If that job is gone, delete "
                                f"{self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLocked(f"{self.path}: could not take over the stale lock")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
