"""One writer per run directory: a lock a second trainer is refused by.

Two trainers on one work directory interleave checkpoints and metrics (one dies inside
orbax's save, `metrics.jsonl` gets steps twice). Process 0 of a job holds an exclusive
`flock` on `RUN/.lock` for the whole run and writes its host, pid and start time into it;
a second job cannot take the lock and stops naming the holder. The kernel drops the lock
when its process dies (kill -9 included), so a relaunch needs no clean-up, on any host of
a shared POSIX file system with working `flock`. Cloud-storage run directories (issue 19)
need another primitive.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from cm3leon_jax.config import ConfigError


class RunLocked(ConfigError):
    """Another trainer holds the run directory."""


class RunLock:
    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"host {h['host']}, pid {h['pid']}, since {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "holder unknown"
            raise RunLocked(f"{self.path.parent} is being trained by another job ({who}); "
                            "one writer per run directory") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
