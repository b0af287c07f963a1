"""One writer per run directory: a lock a second trainer is refused by.

Two trainers on one work directory interleave checkpoints and metrics (one dies inside
orbax's save, `metrics.jsonl` gets steps twice). Process 0 of a job holds `RUN/.lock` for
the whole run, with its host, pid and start time in it; a second job cannot take the lock
and stops naming the holder.

- Local and shared POSIX file systems: an exclusive `flock`. The kernel drops it when its
  process dies (kill -9 included), so a relaunch needs no clean-up.
- Cloud storage (`gs://`, `s3://`): an object created only if absent (GCS
  `ifGenerationMatch=0` through fsspec's `mode="create"`), refreshed by a heartbeat
  thread every `HEARTBEAT_S`. Nothing drops it when the holder dies, so it is taken over
  (deleted, then created only if absent again: of two jobs taking over at once, one
  wins) when its heartbeat is older than `STALE_S`, or at once when its holder was a
  process of this host that no longer exists (a relaunch after kill -9).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

import fsspec  # epath's backend for URLs; it offers create-only writes

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError

HEARTBEAT_S = 15.0
STALE_S = 90.0  # six missed heartbeats: the holder is gone (or cut off from the bucket)


class RunLocked(ConfigError):
    """Another trainer holds the run directory."""


def _holder(text: str) -> tuple[str, dict]:
    try:
        h = json.loads(text)
        return f"host {h['host']}, pid {h['pid']}, since {h['started']}", h
    except (ValueError, KeyError, TypeError):
        return "holder unknown", {}


def _dead_here(held: dict) -> bool:
    """The holder was a process of this host, and it is gone."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}


class RunLock:
    def __init__(self, path: storage.PathLike):
        self.path = storage.path(path)
        self.fd, self._stop, self._beat = None, None, None

    def _refuse(self, who: str) -> RunLocked:
        return RunLocked(f"{self.path.parent} is being trained by another job ({who}); "
                         "one writer per run directory")

    def acquire(self) -> "RunLock":
        return self._acquire_object() if storage.is_remote(self.path) else self._acquire_flock()

    def _acquire_flock(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who, _ = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise self._refuse(who) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self.fd = fd
        return self

    def _acquire_object(self) -> "RunLock":
        fs, key = fsspec.core.url_to_fs(os.fspath(self.path))
        me = _me()
        for attempt in range(2):
            try:
                fs.pipe_file(key, json.dumps(me).encode(), mode="create")
                break
            except FileExistsError:
                try:
                    who, held = _holder(fs.cat_file(key).decode(errors="replace"))
                except FileNotFoundError:  # released between the two calls
                    continue
                age = time.time() - float(held.get("heartbeat", 0))
                dead = _dead_here(held)
                if attempt or (age < STALE_S and not dead):
                    raise self._refuse(who) from None
                why = "its process is gone" if dead else f"no heartbeat for {age:.0f}s"
                print(f"{self.path}: taking over a stale lock ({who}; {why})", flush=True)
                fs.rm_file(key)
        else:
            raise self._refuse("it was taken while this job was taking it over")
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                fs.pipe_file(key, json.dumps({**me, "heartbeat": time.time()}).encode())

        self._beat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        self._fs, self._key = fs, key
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self._stop is not None:
            self._stop.set()
            self._beat.join()
            self._fs.rm_file(self._key)
            self._stop = None
