"""One writer per run directory: a lock a second trainer is refused by.

Two trainers on one work directory interleave checkpoints and metrics (one dies inside
orbax's save, `metrics.jsonl` gets steps twice). Process 0 of a job holds `RUN/.lock` for
the whole run, with its host, pid and start time in it; a second job cannot take the lock
and stops naming the holder.

- Local and shared POSIX file systems: an exclusive `flock`. The kernel drops it when its
  process dies (kill -9 included), so a relaunch needs no clean-up.
- Google Cloud Storage (`gs://`): an object created only if absent
  (`ifGenerationMatch=0`). Every later write is conditioned on the generation this job
  wrote last, so two jobs can never both believe they hold it: a heartbeat thread
  rewrites it every `HEARTBEAT_S`; when a write finds another generation the lock is
  *lost* (`RunLock.lost`, the trainer stops at its next checkpoint). Nothing drops the
  object when its holder dies, so a lock is taken over — overwritten conditioned on the
  generation read — when its heartbeat is older than `STALE_S`, or at once when its
  holder was a process of this machine (same host and boot id) that no longer exists (a
  relaunch after kill -9). Of two jobs taking over at once, one write wins.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError

HEARTBEAT_S = 15.0
STALE_S = 90.0  # six missed heartbeats: the holder is gone (or cut off from the bucket)


class RunLocked(ConfigError):
    """Another trainer holds the run directory."""


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def _holder(text: str) -> tuple[str, dict]:
    try:
        h = json.loads(text)
        return f"host {h['host']}, pid {h['pid']}, since {h['started']}", h
    except (ValueError, KeyError, TypeError):
        return "holder unknown", {}


def _dead_here(held: dict) -> bool:
    """The holder was a process of this machine (host and boot), and it is gone."""
    if (held.get("host"), held.get("boot")) != (socket.gethostname(), _boot_id()) \
            or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _me() -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}


class RunLock:
    def __init__(self, path: storage.PathLike):
        self.path = storage.path(path)
        self.fd, self.blob, self.lost = None, None, False
        self._stop, self._beat = None, None

    def _refuse(self, who: str) -> RunLocked:
        return RunLocked(f"{self.path.parent} is being trained by another job ({who}); "
                         "one writer per run directory")

    def acquire(self) -> "RunLock":
        if str(self.path).startswith("gs://"):
            return self._acquire_object()
        if storage.is_remote(self.path):
            raise ConfigError(f"{self.path.parent}: the run lock needs a local file system or "
                              "gs://; this store has no conditional writes here")
        return self._acquire_flock()

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
        from google.api_core.exceptions import PreconditionFailed  # gs:// only (gcsfs's dependency)
        from google.cloud import storage as gcs  # generation preconditions, which fsspec lacks

        bucket, name = str(self.path)[len("gs://"):].split("/", 1)
        blob = gcs.Client().bucket(bucket).blob(name)
        me = _me()
        for _ in range(2):
            try:
                blob.upload_from_string(json.dumps(me), if_generation_match=0)
                break
            except PreconditionFailed:
                held = blob.bucket.get_blob(name)
            if held is None:  # released between the two calls: try again
                continue
            who, h = _holder(held.download_as_text())
            age = time.time() - float(h.get("heartbeat", 0))
            dead = _dead_here(h)
            if age < STALE_S and not dead:
                raise self._refuse(who)
            why = "its process is gone" if dead else f"no heartbeat for {age:.0f}s"
            try:  # the write succeeds only if nobody changed the lock since it was read
                blob.upload_from_string(json.dumps(me), if_generation_match=held.generation)
            except PreconditionFailed:
                raise self._refuse("taken while this job was taking it over") from None
            print(f"{self.path}: took over a stale lock ({who}; {why})", flush=True)
            break
        else:
            raise self._refuse("taken and released while this job was acquiring it")
        self.blob = blob
        self._start_heartbeat(me, PreconditionFailed)
        return self

    def _start_heartbeat(self, me: dict, precondition_failed) -> None:
        self._stop = threading.Event()

        def beat():
            last_ok = time.time()
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.blob.upload_from_string(json.dumps({**me, "heartbeat": time.time()}),
                                                 if_generation_match=self.blob.generation)
                    last_ok = time.time()
                except precondition_failed:  # another job took it over
                    self.lost = True
                    return
                except Exception:  # noqa: BLE001 - a transient error: retry at the next beat
                    if time.time() - last_ok > STALE_S / 2:
                        self.lost = True  # others may already see it stale
                        return

        self._beat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self._stop is not None:
            self._stop.set()
            self._beat.join()
            self._stop = None
            if not self.lost:
                from google.api_core.exceptions import GoogleAPICallError  # gs:// only

                try:  # only the generation this job wrote: never another job's lock
                    self.blob.delete(if_generation_match=self.blob.generation)
                except GoogleAPICallError:
                    pass  # taken over meanwhile, or already gone
