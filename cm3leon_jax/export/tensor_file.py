"""Write a safetensors file one piece at a time, from arrays sharded over any mesh.

The safetensors layout is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte range) and the raw bytes of the tensors back to back. Every shape is
known before any data is read, so the header goes first and each tensor follows as a
sequence of pieces (slices along its first axis): the writer holds at most one piece on the
host, and a sharded array is only ever gathered one piece at a time. This is the
"tensor by tensor" export path; the `safetensors` package needs the whole dict in memory.

Only process 0 writes; every process runs the gathers (they are collectives). The file is
written as a stream, so `path` may be on cloud storage (storage.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.train.weights import DTYPES

PIECE_BYTES = 256 * 2**20  # largest slice gathered to the host at once


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One named tensor of the file and how to produce it piece by piece.

    `pieces` are called in order; their results, concatenated along axis 0, are the tensor.
    """
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: Sequence[Callable[[], np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def header(tensors: Sequence[Tensor], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header, padded with spaces to a multiple of 8 bytes."""
    entries, offset = {}, 0
    for t in tensors:
        if t.name in entries:
            raise ValueError(f"tensor name {t.name!r} appears twice")
        entries[t.name] = {"dtype": DTYPES[np.dtype(t.dtype)], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write(path: storage.PathLike, tensors: Sequence[Tensor], metadata: dict[str, str],
          desc: str = "export") -> int:
    """Write `tensors` to `path` (process 0 only); returns the bytes of tensor data."""
    lead = jax.process_index() == 0
    total = sum(t.nbytes for t in tensors)
    f = storage.path(path).open("wb") if lead else None
    try:
        if lead:
            f.write(header(tensors, metadata))
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not lead,
                  dynamic_ncols=True) as bar:
            for t in tensors:
                written = 0
                for piece in t.pieces:
                    a = np.ascontiguousarray(piece())
                    if a.dtype != t.dtype or a.shape[1:] != tuple(t.shape[1:]):
                        raise ValueError(f"{t.name}: a piece has shape {a.shape} {a.dtype}, "
                                         f"expected [*, {t.shape[1:]}] {t.dtype}")
                    if lead:
                        f.write(a.data)
                    written += a.nbytes
                    bar.update(a.nbytes)
                if written != t.nbytes:
                    raise ValueError(f"{t.name}: pieces gave {written} bytes, "
                                     f"the header says {t.nbytes}")
    finally:
        if f is not None:
            f.close()
    return total


# --- pieces of sharded arrays ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _gather(fn: Callable, mesh: Mesh):
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def fetch(fn: Callable, mesh: Mesh, *args) -> np.ndarray:
    """`fn(*args)` computed where the arrays live, then replicated and copied to the host.

    `fn` must be a module-level (hashable, stable) function so its compilation is reused.
    """
    out = _gather(fn, mesh)(*args)
    return np.asarray(out.addressable_shards[0].data)


def _rows(a, start, size):
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=0)


@functools.lru_cache(maxsize=None)
def _rows_fn(size: int):
    return functools.partial(_rows, size=size)


def row_pieces(array: jax.Array, mesh: Mesh, piece_bytes: int = PIECE_BYTES):
    """Callables giving `array[lo:hi]` on the host, each at most `piece_bytes` (one row at
    least), in order along axis 0."""
    row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
    step = max(1, piece_bytes // row_bytes)
    return [functools.partial(_piece, array, mesh, lo, min(step, array.shape[0] - lo))
            for lo in range(0, array.shape[0], step)]


def _piece(array, mesh, lo, size):
    return fetch(_rows_fn(size), mesh, array, np.int32(lo))
