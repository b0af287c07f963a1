"""User paths: local or cloud storage (`gs://`, `s3://`), one abstraction, `etils.epath`.

Every path a user gives (work, data, retrieval and export directories, tokenizers, source
files) becomes an `epath.Path` here; the code reads and writes through its pathlib-like
API, never `open()` / `os.path`, so `gs://bucket/run` works wherever `./run` does. Orbax
and TensorStore take the same strings; grain's ArrayRecord reader reads `gs://` itself.

What a path cannot do on object storage is handled here, once:
- libraries that only write local files (the ArrayRecord writer, ScaNN, sentencepiece's
  trainer) write into `staged_file` (a temp file renamed into place locally, so a reader
  never sees half a file; uploaded whole on success remotely) or `staged_dir` (the
  directory itself locally; a temp folder uploaded on success remotely: callers mark a
  directory complete with a file written last);
- libraries that only read local files get `local_copy`;
- objects cannot be appended to: `append_text` rewrites a remote object (callers batch);
- what epath leaves out: `copy` between any two places, `files` (a sorted recursive
  listing), `read_range` (one ranged read), `version` (GCS generations), `absolute`, and
  .npy/.npz files memory-mapped where local (`load_npy`, `save_npy`, ...).

Testing against an emulator is a matter of environment variables only (a real bucket
works by leaving them unset): `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage:
epath, TensorBoard), `CLOUD_STORAGE_EMULATOR_ENDPOINT` (google-cloud-cpp: ArrayRecord),
`TENSORSTORE_GCS_HTTP_URL` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (TensorStore: orbax).
`emulator_environment(url)` gives all four.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path as LocalPath

import fsspec
import numpy as np
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

REMOTE_SCHEMES = ("gs://", "s3://")

# Several processes share a bucket (the hosts of a pod, a relaunch, a reader beside the
# trainer): listings must come from the bucket, not from an fsspec cache of this process.
for _scheme in ("gs", "gcs", "s3", "s3a"):
    fsspec.config.conf.setdefault(_scheme, {}).setdefault("use_listings_cache", False)

# gcsfs probes each bucket's type and logs a warning per call without credentials of a
# real project (emulators, anonymous buckets); the probe falls back correctly.
logging.getLogger("gcsfs").setLevel(logging.ERROR)


def path(p: PathLike) -> epath.Path:
    """A user path as an epath.Path; URLs of unsupported schemes are refused by name."""
    s = os.fspath(p)
    if "://" in s and not s.startswith(REMOTE_SCHEMES):
        raise ValueError(f"{s}: unsupported storage scheme (supported: local paths, "
                         f"{', '.join(REMOTE_SCHEMES)})")
    return epath.Path(s)


def is_remote(p: PathLike) -> bool:
    return os.fspath(p).startswith(REMOTE_SCHEMES)


def local(p: PathLike) -> LocalPath:
    """A path that must be on this machine's file system (sockets, flock, a GUI)."""
    if is_remote(p):
        raise ValueError(f"{os.fspath(p)}: needs a local path here, not cloud storage")
    return LocalPath(os.fspath(p))


def emulator_environment(url: str) -> dict[str, str]:
    """The variables that point every storage client of the stack at a GCS emulator."""
    return {"STORAGE_EMULATOR_HOST": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


@contextlib.contextmanager
def staged_file(dest: PathLike):
    """A local file to write; it becomes `dest` only if the block succeeds."""
    dest = path(dest)
    if not is_remote(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")  # one writer per file: a rerun reuses it
        try:
            yield LocalPath(os.fspath(tmp))
            os.replace(tmp, dest)
        finally:
            LocalPath(os.fspath(tmp)).unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="cm3leon-stage-") as d:
        tmp = LocalPath(d) / dest.name
        yield tmp
        copy(tmp, dest)


@contextlib.contextmanager
def staged_dir(dest: PathLike):
    """A local directory to fill; its files are copied to `dest` if the block succeeds."""
    dest = path(dest)
    if not is_remote(dest):
        dest.mkdir(parents=True, exist_ok=True)
        yield LocalPath(os.fspath(dest))
        return
    with tempfile.TemporaryDirectory(prefix="cm3leon-stage-") as d:
        yield LocalPath(d)
        copy(LocalPath(d), dest)


def copy(src: PathLike, dest: PathLike) -> list[epath.Path]:
    """Copy a file or a directory tree between any two places (local or remote); the
    files written, in order. Local to local keeps modification times."""
    src, dest = path(src), path(dest)
    if src.is_dir():
        return [f for child in sorted(src.iterdir()) for f in copy(child, dest / child.name)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not (is_remote(src) or is_remote(dest)):
        shutil.copy2(src, dest)
    elif not is_remote(src):  # one upload, committed only when complete
        fs, key = fsspec.core.url_to_fs(os.fspath(dest))
        fs.put_file(os.fspath(src), key)
    else:
        with src.open("rb") as r, dest.open("wb") as w:
            shutil.copyfileobj(r, w, 8 << 20)
    return [dest]


@contextlib.contextmanager
def local_copy(src: PathLike):
    """A local path with the contents of `src` (a file or a directory), for readers that
    take only local paths; a local `src` is used as it is."""
    src = path(src)
    if not is_remote(src):
        yield LocalPath(os.fspath(src))
        return
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    with tempfile.TemporaryDirectory(prefix="cm3leon-copy-") as d:
        out = LocalPath(d) / src.name
        copy(src, out)
        if src.is_dir():
            out.mkdir(exist_ok=True)  # an empty folder has no object to copy
        yield out


def write_text_atomic(dest: PathLike, text: str) -> None:
    """Whole-file write a reader never sees half of (local rename; objects are atomic)."""
    with staged_file(dest) as tmp:
        tmp.write_text(text)


def append_text(dest: PathLike, text: str) -> None:
    """Append; on object storage this rewrites the object, so callers append in batches."""
    dest = path(dest)
    if not is_remote(dest):
        with open(os.fspath(dest), "a") as f:
            f.write(text)
        return
    old = dest.read_text() if dest.exists() else ""
    dest.write_text(old + text)


def move_aside(src: PathLike, dest: PathLike) -> None:
    """Rename a file or directory; on object storage a copy then a delete."""
    src, dest = path(src), path(dest)
    if not is_remote(src):
        os.replace(src, dest)
        return
    if src.is_dir():
        for child in src.iterdir():
            move_aside(child, dest / child.name)
        if src.exists():
            src.rmtree()
        return
    src.copy(dest, overwrite=True)
    src.unlink()


def absolute(p: PathLike) -> str:
    """The path independent of the working directory and links (a URL: normalised)."""
    return str(path(p)) if is_remote(p) else str(LocalPath(os.fspath(p)).resolve())


def files(p: PathLike) -> list[epath.Path]:
    """The files of a directory tree in sorted order, or the file itself (epath has no
    rglob on URLs; its walk() drops their scheme)."""
    p = path(p)
    if not p.is_dir():
        return [p]
    return sorted(f for child in p.iterdir() for f in files(child))


def read_range(p: PathLike, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file in one read (on cloud storage one ranged GET, where
    epath's file objects would read ahead megabytes)."""
    if not is_remote(p):
        with open(os.fspath(p), "rb") as f:
            return os.pread(f.fileno(), stop - start, start)
    return fsspec.core.url_to_fs(os.fspath(p))[0].cat_file(os.fspath(p), start=start, end=stop)


def version(p: PathLike) -> tuple[int, int]:
    """(bytes, version) of a file, which changes with every write: its modification time
    in ns locally; on cloud storage the object's generation where the store has one (GCS),
    else its modification time in s."""
    if not is_remote(p):
        st = os.stat(os.fspath(p))
        return st.st_size, st.st_mtime_ns
    fs = fsspec.core.url_to_fs(os.fspath(p))[0]
    info = fs.info(os.fspath(p))
    return int(info["size"]), int(info.get("generation") or path(p).stat().mtime)


def save_npy(dest: PathLike, a: np.ndarray) -> None:
    """A .npy file a reader never sees half written (a local rename; an object is whole)."""
    with staged_file(dest) as tmp, tmp.open("wb") as f:
        np.save(f, a)


def save_npz(dest: PathLike, **arrays: np.ndarray) -> None:
    """A .npz file, written like `save_npy`."""
    with staged_file(dest) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)


def load_npy(src: PathLike, mmap: bool = False) -> np.ndarray:
    """A .npy array; memory-mapped with `mmap` where the file is local, else read whole."""
    src = path(src)
    if mmap and not is_remote(src):
        return np.load(os.fspath(src), mmap_mode="r")
    with src.open("rb") as f:
        return np.load(f)


def load_npz(src: PathLike) -> dict[str, np.ndarray]:
    """Every array of a .npz file."""
    with path(src).open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}
