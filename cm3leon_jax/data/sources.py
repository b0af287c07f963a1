"""Image–caption sources: random-access sequences of `Pair(id, image, caption, meta)`.

Every source is a plain sequence (`len(src)`, `src[i]`), so it is a grain data source and
prepare workers can split it by index. `image` is uint8 [H, W, 3]; `caption` a str; `meta`
a JSON-serialisable dict (the ground truth where the source has one). A record that cannot
be read raises `BadRecord` with a reason from `REASONS` and the record id, so prepare can
count it, log it and go on; nothing is dropped silently.

Sources: `shapes` (built in), `fashion_mnist` (Debian's IDX files), `tfds` (any builder with
an image and a text feature, through `tfds.data_source`), `jsonl` (image path + caption per
line); `open_source(cfg.source)` picks one. Large data is loaded lazily, once per process,
so a source pickles as its few settings when it is sent to a prepare worker.

`shapes` serves the built-in world of cm3leon_jax/shapes/: scene i depends only on (seed,
i), and its `meta` (the scene's objects) lets later stages score generated images from
pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
from PIL import Image

from cm3leon_jax.shapes.world import BACKGROUND, check_world, draw, shapes_caption, shapes_scene

# Why a record was skipped (manifest.json `skipped` keys).
REASONS = ("missing_file", "corrupt_image", "wrong_mode", "wrong_shape", "empty_caption",
           "bad_utf8", "bad_line", "lossy_text")


class Pair(NamedTuple):
    id: str
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    meta: dict  # JSON-serialisable ground truth ({} when the source has none)


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
    """`size` procedural scenes of 1..max_objects coloured shapes at `resolution` pixels."""

    size: int
    resolution: int = 64
    seed: int = 0
    max_objects: int = 3

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"shapes: size={self.size} must be >= 1")
        check_world(self.resolution, self.max_objects)

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"shapes: index {index} outside [0, {self.size})")
        return index

    def caption(self, index: int) -> str:
        index = self._check(index)
        return shapes_caption(shapes_scene(index, self.seed, self.resolution, self.max_objects))

    def __getitem__(self, index: int) -> Pair:
        index = self._check(index)
        objects = shapes_scene(index, self.seed, self.resolution, self.max_objects)
        image = draw(objects, self.resolution)
        meta: dict[str, Any] = {"source": "shapes", "resolution": self.resolution,
                                "background": list(BACKGROUND), "count": len(objects),
                                "objects": objects}
        return Pair(f"shapes-{self.seed}-{index}", image, shapes_caption(objects), meta)


# --- fashion_mnist -------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                         "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
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
    stem = Path(directory) / _FASHION_MNIST_FILES[split]
    images = read_idx(Path(f"{stem}-images-idx3-ubyte.gz"))
    labels = read_idx(Path(f"{stem}-labels-idx1-ubyte.gz"))
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

PIL_MODES = ("RGB", "RGBA", "L")  # read as is; any other mode is skipped as wrong_mode


@functools.lru_cache(maxsize=4)
def _jsonl_lines(path: str) -> tuple[bytes, ...]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"jsonl source {file} does not exist")
    return tuple(line for line in file.read_bytes().splitlines() if line.strip())


def read_image(path: Path, record_id: str) -> np.ndarray:
    """An image file as uint8 RGB, or BadRecord (missing_file, corrupt_image, wrong_mode)."""
    if not path.is_file():
        raise BadRecord("missing_file", record_id, str(path))
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in PIL_MODES:
                raise BadRecord("wrong_mode", record_id, f"{path}: mode {img.mode}")
            return to_rgb(np.asarray(img), record_id)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord("corrupt_image", record_id, f"{path}: {e}") from None


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
        record_id = f"{Path(self.path).stem}-{index}"
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
        image_path = Path(self.path).parent / record[self.image_key]
        meta = {"source": "jsonl", "image": record[self.image_key], "line": int(index)}
        return Pair(record_id, read_image(image_path, record_id), caption, meta)


def open_source(cfg, resolution: Optional[int] = None):
    """The source a `SourceConfig` names; `resolution` renders `shapes` when it has none."""
    if cfg.kind == "shapes":
        return ShapesSource(cfg.size, cfg.resolution or resolution, cfg.seed, cfg.max_objects)
    if cfg.kind == "fashion_mnist":
        return FashionMnistSource(cfg.path or FASHION_MNIST_DIR, cfg.split, cfg.size)
    if cfg.kind == "tfds":
        return TfdsSource(cfg.name, cfg.split, cfg.data_dir, cfg.image_key, cfg.text_key, cfg.size)
    if cfg.kind == "jsonl":
        return JsonlSource(cfg.path, cfg.image_key, cfg.text_key, cfg.size)
    raise ValueError(f"unknown source kind {cfg.kind!r}")
