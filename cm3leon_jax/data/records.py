"""Tokenized documents on disk: ArrayRecord shards of msgpack records.

A prepared data directory holds

    manifest.json                      what was prepared, from what, and what was skipped
    vocab.json                         the vocabulary (cm3leon_jax.vocab.Vocab)
    documents/shard-00000-of-00004.array_record ...

and one record per image–caption document with the fields

    id       str         the source's record id
    caption  str         the original caption
    text     int32 [n]   caption tokens, already vocabulary ids (text range)
    image    int32 [m]   image tokens, already vocabulary ids (image range)
    pixels   uint8 [H, W, 3]  the image at the tokenizer's resolution (optional)
    meta     str         JSON ground truth from the source (e.g. the shapes scene), or ""

Documents are addressed by their global index: shards in name order, records in order.
Neighbor tables and the input pipeline use that index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from cm3leon_jax.layout import DataDir

FIELDS = ("id", "caption", "text", "image", "pixels", "meta")


def encode_document(doc: dict) -> bytes:
    unknown = set(doc) - set(FIELDS)
    if unknown:
        raise ValueError(f"document {doc.get('id')!r}: unknown fields {sorted(unknown)}")
    out = {"id": str(doc["id"]), "caption": str(doc["caption"]),
           "text": np.asarray(doc["text"], np.int32), "image": np.asarray(doc["image"], np.int32),
           "meta": str(doc.get("meta", ""))}
    if doc.get("pixels") is not None:
        out["pixels"] = np.asarray(doc["pixels"], np.uint8)
    return serialization.msgpack_serialize(out)


def decode_document(data: bytes) -> dict:
    doc = serialization.msgpack_restore(data)
    doc.setdefault("pixels", None)
    return doc


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.array_record"


def shard_paths(data_dir: str | Path) -> list[Path]:
    documents = DataDir(Path(data_dir)).documents
    paths = sorted(documents.glob("shard-*.array_record"))
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no document shards under {documents.name}/")
    return paths


def write_shard(path: str | Path, docs: Iterable[dict]) -> int:
    """Write one shard atomically (temp file, then rename); returns the record count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    for doc in docs:
        writer.write(encode_document(doc))
        count += 1
    writer.close()
    tmp.rename(path)
    return count


def open_documents(data_dir: str | Path):
    """Random access to every document by global index (a grain data source of bytes)."""
    return grain.sources.ArrayRecordDataSource([str(p) for p in shard_paths(data_dir)])


def iter_documents(data_dir: str | Path) -> Iterator[dict]:
    source = open_documents(data_dir)
    for i in range(len(source)):
        yield decode_document(source[i])
