"""Image–caption sources: random-access sequences of `Pair(id, image, caption, meta)`.

Every source is a plain sequence (`len(src)`, `src[i]`), so it is a grain data source and
prepare workers can split it by index. `image` is uint8 [H, W, 3]; `caption` a str; `meta`
a JSON-serialisable dict (the ground truth where the source has one). A record that cannot
be read raises `BadRecord` with a reason from `REASONS` and the record id, so prepare can
count it, log it and go on; nothing is dropped silently.

Sources: `shapes` (built in), `fashion_mnist` (Debian's IDX files), `tfds` (any builder with
an image and a text feature, through `tfds.data_source`), `jsonl` (image path + caption per
line), `webdataset` (img2dataset's tar shards) and `parquet` (image bytes + caption
columns); `open_source(cfg.source)` picks one. Large data is loaded lazily, once per
process, so a source pickles as its few settings when it is sent to a prepare worker; the
two sharded sources add the layout they listed (files, records per file and, for tar
shards, where each sample starts), so a reader process never lists or scans them again.

Source paths may be on cloud storage (storage.py): `gs://bucket/shards/{00000..00009}.tar`,
a JSONL file with its images beside it, a Fashion-MNIST folder. A webdataset reader reads
each sample with one ranged read; a file that changes after listing is refused (its
modification time locally, its object generation on GCS).

`shapes` serves the built-in world of cm3leon_jax/shapes/: scene i depends only on (seed,
i), and its `meta` (the scene's objects) lets later stages score generated images from
pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import gzip
import io
import json
import logging
import os
import posixpath
import re
import tarfile
from typing import Any, NamedTuple, Optional

import numpy as np
from braceexpand import UnbalancedBracesError, braceexpand
from PIL import Image

from cm3leon_jax import storage
from cm3leon_jax.config.loader import ConfigError
from cm3leon_jax.shapes.world import (BACKGROUND, check_world, describe, draw, named_caption,
                                      named_objects, named_scene, shapes_caption, shapes_scene)

log = logging.getLogger(__name__)

# Why a record was skipped (manifest.json `skipped` keys). `truncated_tar` is the one record
# a damaged webdataset shard adds after its readable samples: the damage, counted.
REASONS = ("missing_file", "corrupt_image", "wrong_mode", "wrong_shape", "empty_caption",
           "bad_utf8", "bad_line", "lossy_text", "truncated_tar")


class Pair(NamedTuple):
    id: str
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    meta: dict  # JSON-serialisable ground truth ({} when the source has none)


class SourceError(ConfigError):
    """The source's files cannot be read as configured (a pattern that matches nothing, a
    shard with nothing readable): the message names the file and the fix. A ConfigError,
    so `cm3leon prepare` reports it without a traceback."""


class BadRecord(Exception):
    """A record that cannot become a document: `reason` is one of REASONS."""

    def __init__(self, reason: str, record_id: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"record {record_id}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.record_id, self.detail = reason, record_id, detail


def check_caption(raw, record_id: str) -> str:
    """The caption as str, or BadRecord: bytes must be UTF-8, and it must not be blank."""
    if isinstance(raw, (bytes, bytearray, np.bytes_)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("bad_utf8", record_id, str(e)) from None
    if not isinstance(raw, str):
        raise BadRecord("empty_caption", record_id, f"caption is {type(raw).__name__}, not text")
    if not raw.strip():
        raise BadRecord("empty_caption", record_id)
    return raw


def to_rgb(image, record_id: str) -> np.ndarray:
    """uint8 [H, W, 3] from gray [H, W] / [H, W, 1], RGB, or RGBA (composited on white)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise BadRecord("wrong_mode", record_id, f"pixels are {image.dtype}, not uint8")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape:
        raise BadRecord("wrong_shape", record_id, f"image shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:  # as Chameleon's tokenizer does: alpha over a white background
        alpha = image[:, :, 3:].astype(np.float32) / 255
        return np.round(image[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return image


def fit_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the short side to `resolution` (Lanczos) and centre-crop a square."""
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
    top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    return resized[top:top + resolution, left:left + resolution]


# --- shapes --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShapesSource:
    """`size` procedural scenes of 1..max_objects coloured shapes at `resolution` pixels;
    with `names` > 0, scenes of that many named ones, captioned by name (world.py)."""

    size: int
    resolution: int = 64
    seed: int = 0
    max_objects: int = 3
    names: int = 0
    zipf: float = 1.0
    name_jitter: bool = True

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"shapes: size={self.size} must be >= 1")
        if self.names < 0 or self.zipf < 0:
            raise ValueError(f"shapes: names={self.names} and zipf={self.zipf} must be >= 0")
        check_world(self.resolution, self.max_objects)

    def _scene(self, index: int) -> tuple[list[dict], str]:
        """(objects, caption) of scene `index`."""
        if not self.names:
            objects = shapes_scene(index, self.seed, self.resolution, self.max_objects)
            return objects, shapes_caption(objects)
        rank = named_scene(index, self.seed, self.names, self.zipf)
        return (named_objects(rank, index, self.seed, self.resolution, self.max_objects,
                              self.name_jitter), named_caption(rank))

    def describe(self, caption: str) -> str:
        """What a caption says in the detector's terms: a name as the scene it shows."""
        if not self.names:
            return caption
        return describe(caption, self.names, self.resolution, self.max_objects)

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"shapes: index {index} outside [0, {self.size})")
        return index

    def caption(self, index: int) -> str:
        return self._scene(self._check(index))[1]

    def __getitem__(self, index: int) -> Pair:
        index = self._check(index)
        objects, caption = self._scene(index)
        image = draw(objects, self.resolution)
        meta: dict[str, Any] = {"source": "shapes", "resolution": self.resolution,
                                "background": list(BACKGROUND), "count": len(objects),
                                "objects": objects}
        return Pair(f"shapes-{self.seed}-{index}", image, caption, meta)


# --- fashion_mnist -------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                         "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


def read_idx(path: storage.Path) -> np.ndarray:
    """An IDX file (gzip or plain) of unsigned bytes, as numpy with the file's shape."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (install dataset-fashion-mnist?)")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes, "
                         f"the file holds {body.size}")
    return body.reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    stem = storage.path(directory) / _FASHION_MNIST_FILES[split]
    images = read_idx(storage.path(f"{stem}-images-idx3-ubyte.gz"))
    labels = read_idx(storage.path(f"{stem}-labels-idx1-ubyte.gz"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{stem}-*: images {images.shape} and labels {labels.shape} disagree")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{stem}-labels: label {labels.max()} is not a Fashion-MNIST class")
    return images, labels


@dataclasses.dataclass(frozen=True)
class FashionMnistSource:
    """Fashion-MNIST 28x28 gray clothes (as RGB), captioned with the class name."""

    directory: str = FASHION_MNIST_DIR
    split: str = "train"
    size: Optional[int] = None  # the first `size` images; null: all

    def __post_init__(self):
        if self.split not in _FASHION_MNIST_FILES:
            raise ValueError(f"fashion_mnist: split={self.split!r} is not one of "
                             f"{list(_FASHION_MNIST_FILES)}")

    def _data(self):
        return _fashion_mnist(self.directory, self.split)

    def __len__(self) -> int:
        n = len(self._data()[1])
        return n if self.size is None else min(self.size, n)

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"fashion_mnist: index {index} outside [0, {len(self)})")
        return index

    def caption(self, index: int) -> str:
        return FASHION_MNIST_CLASSES[self._data()[1][self._check(index)]]

    def __getitem__(self, index: int) -> Pair:
        index = self._check(index)
        images, labels = self._data()
        label = int(labels[index])
        meta = {"source": "fashion_mnist", "split": self.split, "label": label,
                "class": FASHION_MNIST_CLASSES[label]}
        return Pair(f"fashion_mnist-{self.split}-{index}", np.repeat(images[index][:, :, None], 3, 2),
                    FASHION_MNIST_CLASSES[label], meta)


# --- tfds ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _tfds_source(name: str, split: str, data_dir: Optional[str]):
    import tensorflow_datasets as tfds  # optional and slow to import: the tfds source only

    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Any prepared TFDS builder with an image and a text feature (nothing downloads)."""

    name: str
    split: str = "train"
    data_dir: Optional[str] = None
    image_key: str = "image"
    text_key: str = "caption"
    size: Optional[int] = None

    def _data(self):
        return _tfds_source(self.name, self.split, self.data_dir)

    def __len__(self) -> int:
        n = len(self._data())
        return n if self.size is None else min(self.size, n)

    def _example(self, index: int) -> tuple[str, dict]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"tfds {self.name}: index {index} outside [0, {len(self)})")
        example = self._data()[index]
        for key in (self.image_key, self.text_key):
            if key not in example:
                raise KeyError(f"tfds {self.name}[{self.split}]: no feature {key!r} "
                               f"(features: {sorted(example)})")
        return f"{self.name}-{self.split}-{index}", example

    def caption(self, index: int) -> str:
        record_id, example = self._example(index)
        return check_caption(example[self.text_key], record_id)

    def __getitem__(self, index: int) -> Pair:
        record_id, example = self._example(index)
        caption = check_caption(example[self.text_key], record_id)
        meta = {"source": "tfds", "name": self.name, "split": self.split, "index": int(index)}
        return Pair(record_id, to_rgb(example[self.image_key], record_id), caption, meta)


# --- jsonl ---------------------------------------------------------------------------

PIL_MODES = ("RGB", "RGBA", "L")  # read as is
CONVERTED = {"P": "RGBA", "PA": "RGBA", "LA": "RGBA", "1": "L"}  # palette, grey+alpha, bilevel
# any other mode (CMYK, 16-bit, float) is skipped as wrong_mode: its conversion is a guess


@functools.lru_cache(maxsize=4)
def _jsonl_lines(path: str) -> tuple[bytes, ...]:
    file = storage.path(path)
    if not file.is_file():
        raise FileNotFoundError(f"jsonl source {file} does not exist")
    return tuple(line for line in file.read_bytes().splitlines() if line.strip())


def decode_image(data: bytes, record_id: str, where: str) -> np.ndarray:
    """Encoded image bytes as uint8 RGB, or BadRecord (corrupt_image, wrong_mode); `where`
    (a file, a shard member, a row) starts the detail."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in CONVERTED:  # transparency kept as alpha, then put on white
                img = img.convert(CONVERTED[img.mode])
            if img.mode not in PIL_MODES:
                raise BadRecord("wrong_mode", record_id, f"{where}: mode {img.mode}")
            return to_rgb(np.asarray(img), record_id)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord("corrupt_image", record_id, f"{where}: {e}") from None


def read_image(path: storage.Path, record_id: str) -> np.ndarray:
    """An image file as uint8 RGB, or BadRecord (missing_file, corrupt_image, wrong_mode)."""
    if not path.is_file():
        raise BadRecord("missing_file", record_id, str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRecord("corrupt_image", record_id, f"{path}: {e}") from None
    return decode_image(data, record_id, str(path))


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """One JSON object per line: an image path (relative to the file) and a caption.

    The record id is the line's `id` value when it has one, else `<file stem>-<line>`.
    """

    path: str
    image_key: str = "image"
    text_key: str = "caption"
    size: Optional[int] = None

    def __len__(self) -> int:
        n = len(_jsonl_lines(self.path))
        return n if self.size is None else min(self.size, n)

    def _record(self, index: int) -> tuple[str, dict]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"jsonl {self.path}: index {index} outside [0, {len(self)})")
        record_id = f"{storage.path(self.path).stem}-{index}"
        try:
            record = json.loads(_jsonl_lines(self.path)[index].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRecord("bad_utf8", record_id, str(e)) from None
        except json.JSONDecodeError as e:
            raise BadRecord("bad_line", record_id, f"{self.path}: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.image_key), str):
            raise BadRecord("bad_line", record_id,
                            f"{self.path}: needs a string {self.image_key!r} field")
        if "id" in record:
            record_id = str(record["id"])
        return record_id, record

    def caption(self, index: int) -> str:
        record_id, record = self._record(index)
        return check_caption(record.get(self.text_key), record_id)

    def __getitem__(self, index: int) -> Pair:
        record_id, record = self._record(index)
        caption = check_caption(record.get(self.text_key), record_id)
        folder = storage.path(self.path).parent
        image_path = _inside(folder, record[self.image_key])
        if image_path is None:  # `../` or an absolute path
            raise BadRecord("bad_line", record_id, f"{self.path}: image "
                            f"{record[self.image_key]!r} is outside {storage.absolute(folder)}; image "
                            "paths are relative to the JSONL file's folder")
        meta = {"source": "jsonl", "image": record[self.image_key], "line": int(index)}
        return Pair(record_id, read_image(image_path, record_id), caption, meta)


def _inside(folder: storage.Path, name: str) -> Optional[storage.Path]:
    """`folder / name` if it stays inside `folder` (a local one after resolving links; on
    cloud storage after `..` is taken away), else None."""
    if not storage.is_remote(folder):
        image_path = storage.path(storage.absolute(folder / name))
        return image_path if image_path.is_relative_to(storage.absolute(folder)) else None
    rel = posixpath.normpath(name)
    if posixpath.isabs(rel) or rel == ".." or rel.startswith("../") or "://" in name:
        return None
    return folder / rel


# --- file patterns (webdataset, parquet) ---------------------------------------------

MAX_RANGE = 1_000_000  # names in one {a..b} of source.path (braceexpand holds a range in memory)
_RANGE = re.compile(r"(?<!\\)\{(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?\}")  # braceexpand's ranges


def source_files(pattern: str) -> list[str]:
    """The files `source.path` names, in a fixed order: braces expanded by `braceexpand`
    (bash's rules, alternatives in the order written; `\\{` is a literal brace), each glob's
    matches sorted, a file named twice kept at its first place. A literal path that does not
    exist, a glob that matches no file, or unbalanced braces is an error naming it."""
    for m in _RANGE.finditer(pattern):
        if abs(int(m[2]) - int(m[1])) // max(int(m[3] or 1), 1) >= MAX_RANGE:
            raise SourceError(f"source.path={pattern!r}: {m[0]} names more than "
                              f"{MAX_RANGE:,} files")
    out, seen = [], set()
    try:
        for part in braceexpand(pattern):
            part = os.path.expanduser(part)
            if any(c in part for c in "*?["):
                matches = _glob(pattern, part)
                if not matches:
                    raise SourceError(f"source.path={pattern!r}: {part} matches no file")
            elif storage.path(part).is_file():
                matches = [part]
            else:
                raise SourceError(f"source.path={pattern!r}: {part} does not exist")
            for p in matches:
                if os.path.normpath(p) not in seen:
                    seen.add(os.path.normpath(p))
                    out.append(p)
    except UnbalancedBracesError:
        raise SourceError(f"source.path={pattern!r}: unbalanced braces (a literal brace is "
                          "written \\{ or \\})") from None
    return out


def _glob(pattern: str, part: str) -> list[str]:
    """The files the glob `part` matches, sorted: `glob.glob`'s locally; on cloud storage
    the listing below the last folder before the first wildcard."""
    if not storage.is_remote(part):
        return sorted(p for p in glob.glob(part) if os.path.isfile(p))
    scheme, rest = part.split("://", 1)
    folders = rest.split("/")
    fixed = next(i for i, name in enumerate(folders) if any(c in name for c in "*?["))
    if fixed == 0:
        raise SourceError(f"source.path={pattern!r}: a wildcard in the bucket name")
    base = storage.path(f"{scheme}://" + "/".join(folders[:fixed]))
    return sorted(str(p) for p in base.glob("/".join(folders[fixed:])) if p.is_file())


class _File(NamedTuple):
    path: str
    stamp: tuple[int, int]  # (bytes, mtime_ns) when listed: a changed file is refused
    records: int
    extra: Any  # per kind: the webdataset _TarLayout, the parquet row-group sizes


def _restore(cls, settings: tuple, layout):
    """Unpickle a sharded source with the layout the sending process had listed."""
    source = cls(*settings)
    if layout is not None:
        object.__setattr__(source, "_listed", layout)
    return source


class _Sharded:
    """Records spread over files: `_list()` lists them once per instance (a reader process
    gets the list with the pickled source), records are numbered file by file in order."""

    def _settings(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def _layout(self) -> tuple[tuple[_File, ...], np.ndarray]:
        """(files, first record of each file and the total)."""
        if "_listed" not in self.__dict__:
            files = self._list()
            object.__setattr__(self, "_listed",
                               (files, np.cumsum([0] + [f.records for f in files])))
        return self.__dict__["_listed"]

    def __reduce__(self):
        return _restore, (type(self), self._settings(), self.__dict__.get("_listed"))

    def __len__(self) -> int:
        n = int(self._layout()[1][-1])
        return n if self.size is None else min(self.size, n)

    def _name(self, file: _File) -> str:
        """The file as record ids name it: its path below the folder all files share, without
        the extension (`train/00000`, `extra/00000` for `{train,extra}/*.tar`)."""
        files = self._layout()[0]
        common = os.path.commonpath([os.path.dirname(f.path) or "." for f in files])
        return os.path.splitext(os.path.relpath(file.path, common))[0]

    def _locate(self, index: int) -> tuple[_File, int]:
        """(file, record within it) of record `index`."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} {self.path}: index {index} outside "
                             f"[0, {len(self)})")
        files, starts = self._layout()
        i = int(np.searchsorted(starts, index, side="right")) - 1
        return files[i], index - int(starts[i])

    def _enough(self, total: int) -> bool:
        """Listing can stop: the first `size` records are known."""
        return self.size is not None and total >= self.size

    def _check_stamp(self, file: _File) -> None:
        """A file changed since it was listed stops prepare. Locally checked at every read
        (a stat); on cloud storage once per file by this instance in this process (a
        metadata request per record would double the requests)."""
        remote = storage.is_remote(file.path)
        checked = self.__dict__.setdefault("_checked", set())
        if remote and file.path in checked:
            return
        if storage.version(file.path) != file.stamp:
            raise SourceError(f"{file.path} changed after prepare listed it; run prepare again")
        if remote:
            checked.add(file.path)


# --- webdataset ----------------------------------------------------------------------

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image member; case-insensitive
_BLOCK = tarfile.BLOCKSIZE
_END = bytes(2 * _BLOCK)  # tar's end-of-archive marker


def _sample_key(name: str) -> Optional[tuple[str, str]]:
    """(key, lower-case extension) of a member name, as webdataset splits it: the key is the
    path up to the first dot of the file name; None for a name without one."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _read_at(f, size: int, at: int) -> bytes:
    f.seek(at)
    return f.read(size)


def _stop_reason(f, at: int, file_size: int,
                 error: Optional[Exception] = None) -> Optional[str]:
    """Why tarfile stopped reading the shard open as `f` at byte `at` (where the next header
    belongs), `error` if it raised one: None at the end-of-archive marker. tarfile ends its
    member list quietly at a cut or bad header, so the bytes there are looked at (through
    `TarInfo.frombuf`)."""
    tail = _read_at(f, len(_END), at)
    if tail == _END:
        after = _read_at(f, tarfile.RECORDSIZE, at + len(_END))  # record padding, then EOF
        if after.strip(b"\0"):
            return (f"data after the end-of-archive marker at byte {at} (archives joined "
                    "end to end? only the first is read)")
        return None
    if not tail:
        return f"no end-of-archive marker: the file ends at byte {at}"
    if tail[:_BLOCK] == bytes(_BLOCK):
        return f"no end-of-archive marker: one zero block at byte {at}, then the file " + (
            "ends" if len(tail) < len(_END) else "goes on")
    if len(tail) < _BLOCK:
        return f"cut inside the header at byte {at}"
    try:
        info = tarfile.TarInfo.frombuf(tail[:_BLOCK], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return f"bad header at byte {at} ({e})"
    if at + _BLOCK + -(-info.size // _BLOCK) * _BLOCK + _BLOCK > file_size:
        return f"cut inside the header at byte {at}"  # a PAX / long-name record, no header after
    return f"bad header at byte {at}" + (f" ({error})" if error else "")


class _TarLayout(NamedTuple):
    starts: np.ndarray  # [samples + 1]: where each sample's first header starts; the end
    damage: Optional[str]  # where the shard breaks, when it does


@functools.lru_cache(maxsize=8)
def _list_tar(path: str, stamp: tuple[int, int]) -> _TarLayout:
    """Where each sample of a shard starts, listed with `tarfile`: a sample is a run of
    consecutive members with one key (webdataset's rule). A shard that breaks before its
    end-of-archive marker keeps the samples before the break; nothing readable at all is a
    SourceError."""
    fix = "re-copy it or leave it out of source.path"
    starts, key, at, damage = [], None, 0, None  # at: where the next header belongs
    with storage.path(path).open("rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise SourceError(f"{path}: a gzip-compressed tar; the webdataset source reads "
                              "members by offset and needs plain .tar shards (gunzip them)")
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.offset_data + member.size > stamp[0]:
                        damage = (f"cut inside member {member.name} (its data ends at byte "
                                  f"{member.offset_data + member.size}, the file at {stamp[0]})")
                        break
                    split = _sample_key(member.name) if member.isfile() else None
                    if split is not None and split[0] != key:
                        key = split[0]
                        starts.append(member.offset)
                    at = tar.offset
        except (tarfile.ReadError, EOFError, tarfile.HeaderError) as e:
            damage = (_stop_reason(f, at, stamp[0], e)
                      or f"bad header at byte {at} ({e})")
        if damage is None:
            damage = _stop_reason(f, at, stamp[0])
    if damage is not None and not starts:
        raise SourceError(f"{path}: nothing readable: {damage} (not a tar file?); {fix}")
    dtype = np.uint32 if stamp[0] < 2**32 else np.int64
    return _TarLayout(np.array(starts + [at], dtype), damage)


def _sample_members(data: bytes) -> list[tarfile.TarInfo]:
    """The members of one sample from its bytes (its first header up to where the next
    sample's starts), read by tarfile; their offsets are within `data` (a reader never
    scans a shard)."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # reads the first header
        member = tar.next()
        while member is not None:
            members.append(member)
            if tar.offset >= len(data):  # where the next header belongs
                break
            member = tar.next()
    return members


@dataclasses.dataclass(frozen=True)
class WebDatasetSource(_Sharded):
    """img2dataset's tar shards: members grouped by key (the name up to its first dot), an
    image KEY.jpg|jpeg|png|webp, its caption KEY.txt, optional KEY.json (kept in `meta`).

    Records: the shards in `source_files` order, each shard's samples in tar order, then,
    for a damaged shard, one `truncated_tar` record naming the damage. Record ids are
    `<shard name without .tar>/<key>`. Listing (tarfile, in the prepare process) reads
    every header once; the layout keeps where each sample starts, so a reader process
    reads a record's bytes (headers and members) in one read and never scans a shard.
    """

    path: str
    size: Optional[int] = None

    def _list(self) -> tuple[_File, ...]:
        files, total = [], 0
        paths = source_files(self.path)
        for path in paths:
            if self._enough(total):
                break
            stamp = storage.version(path)
            layout = _list_tar(path, stamp)
            samples = len(layout.starts) - 1
            if layout.damage:
                log.warning("%s is damaged: %s; its %d readable sample(s) are used", path,
                            layout.damage, samples)
            files.append(_File(path, stamp, samples + bool(layout.damage), layout))
            total += files[-1].records
        if total == 0:
            raise SourceError(f"source.path={self.path!r}: the {len(paths)} shards hold no "
                              "sample")
        return tuple(files)

    def _sample(self, index: int) -> tuple[str, str, str, dict, bytes]:
        """(record id, key, shard path, {kind: TarInfo, "names": [...]}, the sample's bytes
        the TarInfo offsets are in) of record `index`."""
        file, local = self._locate(index)
        self._check_stamp(file)
        shard, starts = self._name(file), file.extra.starts
        if local == len(starts) - 1:  # the damage record
            raise BadRecord("truncated_tar", f"{shard}.tar", f"{file.path}: {file.extra.damage}; "
                            f"{local} sample(s) before it are read, the rest is lost")
        members: dict[str, Any] = {"names": []}
        key = None
        data = storage.read_range(file.path, int(starts[local]), int(starts[local + 1]))
        try:
            found = _sample_members(data)
        except (tarfile.ReadError, EOFError, tarfile.HeaderError) as e:
            raise SourceError(f"{file.path}: {e}; it changed after prepare listed it") from None
        for member in found:
            split = _sample_key(member.name) if member.isfile() else None
            if split is None:
                continue
            key, ext = split
            members["names"].append(member.name)
            kind = ("image" if ext in IMAGE_EXTENSIONS else "text" if ext == "txt"
                    else "meta" if ext == "json" else None)
            if kind is not None and kind not in members:
                members[kind] = member  # the first of each kind
        return f"{shard}/{key}", key, file.path, members, data

    def _caption(self, data: bytes, path: str, record_id: str, key: str, members: dict) -> str:
        if "text" not in members:
            raise BadRecord("empty_caption", record_id, f"{path}: key {key} has no .txt member "
                            f"(members: {', '.join(members['names'])})")
        return check_caption(_member(data, members["text"]), record_id)

    def caption(self, index: int) -> str:
        record_id, key, path, members, data = self._sample(index)
        return self._caption(data, path, record_id, key, members)

    def __getitem__(self, index: int) -> Pair:
        record_id, key, path, members, data = self._sample(index)
        if "image" not in members:
            raise BadRecord("missing_file", record_id, f"{path}: key {key} has no image "
                            f"member (.{'/.'.join(IMAGE_EXTENSIONS)}; members: "
                            f"{', '.join(members['names'])})")
        caption = self._caption(data, path, record_id, key, members)
        meta: dict[str, Any] = {"source": "webdataset", "shard": path, "key": key}
        if "meta" in members:
            try:
                meta["json"] = json.loads(_member(data, members["meta"]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRecord("bad_line", record_id,
                                f"{path}: {members['meta'].name}: {e}") from None
        image = members["image"]
        return Pair(record_id, decode_image(_member(data, image), record_id,
                                            f"{path}: {image.name}"), caption, meta)


def _member(data: bytes, member: tarfile.TarInfo) -> bytes:
    return data[member.offset_data:member.offset_data + member.size]


# --- parquet -------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _row_group(path: str, stamp: tuple[int, int], group: int, columns: tuple[str, ...]):
    """One row group's `columns` (prepare's readers take runs of consecutive records: a
    reader reads each group it needs once)."""
    with _parquet_file(path) as f:
        return f.read_row_group(group, columns=list(columns))


@contextlib.contextmanager
def _parquet_file(path: str):
    """A `pq.ParquetFile`: pyarrow opens a local file itself and reads an object through
    the epath file object (seeking: the footer and the row groups read, not the file)."""
    import pyarrow.parquet as pq  # the parquet source only: reader processes start without it

    if not storage.is_remote(path):
        yield pq.ParquetFile(path)
        return
    with storage.path(path).open("rb") as f:
        yield pq.ParquetFile(f)


@dataclasses.dataclass(frozen=True)
class ParquetSource(_Sharded):
    """Rows of Parquet files: encoded image bytes (a binary column, or a struct with a
    `bytes` field as Hugging Face datasets write) and a caption column. img2dataset's
    parquet output is `jpg` + `caption`, with a row (null `jpg`) for each failed download.

    Records: the files in `source_files` order, rows in file order; ids `<file stem>/<row>`.
    """

    path: str
    image_key: str = "jpg"
    text_key: str = "caption"
    size: Optional[int] = None

    def _check_schema(self, path: str, schema) -> None:
        import pyarrow as pa  # the parquet source only: reader processes start without it

        t = pa.types
        for key, column in (("image_key", self.image_key), ("text_key", self.text_key)):
            if column not in schema.names:
                raise SourceError(f"{path}: no column {column!r} (source.{key}); its "
                                  f"columns: {', '.join(schema.names)}")

        def binary(typ) -> bool:
            return t.is_binary(typ) or t.is_large_binary(typ)

        image = schema.field(self.image_key).type
        if not (binary(image) or (t.is_struct(image) and image.get_field_index("bytes") >= 0
                                  and binary(image.field("bytes").type))):
            raise SourceError(f"{path}: column {self.image_key!r} (source.image_key) is "
                              f"{image}, not encoded image bytes (binary, or a struct with "
                              "binary `bytes`)")
        caption = schema.field(self.text_key).type
        if not (t.is_string(caption) or t.is_large_string(caption) or binary(caption)):
            raise SourceError(f"{path}: column {self.text_key!r} (source.text_key) is "
                              f"{caption}, not text")

    def _list(self) -> tuple[_File, ...]:
        files, total = [], 0
        for path in source_files(self.path):
            if self._enough(total):
                break
            try:
                with _parquet_file(path) as f:
                    schema, metadata = f.schema_arrow, f.metadata
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: name the file
                raise SourceError(f"{path}: not a readable Parquet file ({e}); re-copy it or "
                                  "leave it out of source.path") from None
            self._check_schema(path, schema)
            groups = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
            files.append(_File(path, storage.version(path), sum(groups), groups))
            total += files[-1].records
        if total == 0:
            raise SourceError(f"source.path={self.path!r}: the {len(files)} files hold no row")
        return tuple(files)

    def _row(self, index: int, columns: tuple[str, ...]):
        """(file, row in it, record id, its row group's `columns`, row in the group)."""
        import pyarrow as pa  # the parquet source only: reader processes start without it

        file, row = self._locate(index)
        self._check_stamp(file)
        record_id = f"{self._name(file)}/{row}"
        starts = np.cumsum((0,) + file.extra)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        try:
            table = _row_group(file.path, file.stamp, group, columns)
        except (OSError, pa.ArrowException) as e:
            raise BadRecord("bad_line", record_id, f"{file.path}: row group {group}: "
                            f"{e}") from None
        return file, row, record_id, table, row - int(starts[group])

    def caption(self, index: int) -> str:
        _, _, record_id, table, i = self._row(index, (self.text_key,))
        return check_caption(table.column(self.text_key)[i].as_py(), record_id)

    def __getitem__(self, index: int) -> Pair:
        file, row, record_id, table, i = self._row(index, (self.image_key, self.text_key))
        where = f"{file.path} row {row}"
        data = table.column(self.image_key)[i].as_py()
        if isinstance(data, dict):  # a Hugging Face Image struct
            if data.get("bytes") is None:
                raise BadRecord("missing_file", record_id, f"{where}: {self.image_key!r} "
                                f"holds no bytes (path {data.get('path')!r}): the parquet "
                                "source reads embedded images only")
            data = data["bytes"]
        if data is None:
            raise BadRecord("missing_file", record_id, f"{where}: {self.image_key!r} is null")
        caption = check_caption(table.column(self.text_key)[i].as_py(), record_id)
        image = decode_image(data, record_id, where)
        meta = {"source": "parquet", "file": file.path, "row": row}
        return Pair(record_id, image, caption, meta)


def open_source(cfg, resolution: Optional[int] = None):
    """The source a `SourceConfig` names; `resolution` renders `shapes` when it has none."""
    if cfg.kind == "shapes":
        return ShapesSource(cfg.size, cfg.resolution or resolution, cfg.seed, cfg.max_objects,
                            cfg.names, cfg.zipf, cfg.name_jitter)
    if cfg.kind == "fashion_mnist":
        return FashionMnistSource(cfg.path or FASHION_MNIST_DIR, cfg.split, cfg.size)
    if cfg.kind == "tfds":
        return TfdsSource(cfg.name, cfg.split, cfg.data_dir, cfg.image_field(), cfg.text_key,
                          cfg.size)
    if cfg.kind == "jsonl":
        return JsonlSource(cfg.path, cfg.image_field(), cfg.text_key, cfg.size)
    if cfg.kind == "webdataset":
        return WebDatasetSource(cfg.path, cfg.size)
    if cfg.kind == "parquet":
        return ParquetSource(cfg.path, cfg.image_field(), cfg.text_key, cfg.size)
    raise ValueError(f"unknown source kind {cfg.kind!r}")
