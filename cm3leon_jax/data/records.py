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
Neighbor tables and the input pipeline use that index. The manifest is written last and
lists the shards and the documents in all; `check_documents` holds the directory to it
before anything reads it (a deleted shard, a half-finished prepare or an edited manifest
would otherwise train on what happens to be there).

The directory may be on cloud storage (storage.py): shards are written locally and
uploaded whole, and grain's ArrayRecord reader reads `gs://` shards itself.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import Path, PathLike

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


def shard_paths(data_dir: PathLike) -> list[Path]:
    documents = DataDir(data_dir).documents
    paths = sorted(documents.glob("shard-*.array_record"))
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no document shards under {documents.name}/")
    return paths


def write_shard(path: PathLike, docs: Iterable[dict]) -> int:
    """Write one shard atomically (a local temp file, then a rename or an upload: the
    ArrayRecord writer writes local files only); returns the record count."""
    with storage.staged_file(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        count = 0
        for doc in docs:
            writer.write(encode_document(doc))
            count += 1
        writer.close()
    return count


def write_manifest(data_dir: PathLike, documents: int, shards: list[str], **more) -> dict:
    """The manifest (atomically, last): the shard names, the documents in all, and what
    the writer adds (prepare: the vocabulary, tokenizers, source, timings)."""
    manifest = {"documents": documents, **more, "shards": list(shards)}
    storage.write_text_atomic(DataDir(data_dir).manifest, json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_documents(data_dir: PathLike, groups: Iterable[Iterable[dict]]) -> int:
    """Documents made elsewhere than `prepare` (tests, benchmarks, data-stats) as a checked
    directory: one shard per group, each with its count, then the manifest; returns the
    number of documents. The vocabulary is the caller's."""
    groups = [list(g) for g in groups]
    names = [shard_name(i, len(groups)) for i in range(len(groups))]
    documents = DataDir(data_dir).documents
    total = 0
    for name, docs in zip(names, groups):
        count = write_shard(documents / name, docs)
        (documents / name).with_suffix(".json").write_text(
            json.dumps({"documents": count, "skipped": {}, "skipped_records": []}) + "\n")
        total += count
    write_manifest(data_dir, total, names, records=total, skipped={})
    return total


def check_documents(data_dir: PathLike, what: str = "data.dir") -> int:
    """The number of documents after holding the shards to the manifest: present, the same
    shard names, each shard's record count as written, the total as the manifest says."""
    d = DataDir(data_dir)
    if not d.manifest.exists():
        raise ConfigError(f"{what}={str(d.root)!r} has no manifest.json: not a finished "
                          "`cm3leon prepare` (an interrupted one leaves none); run or rerun it")
    try:
        manifest = json.loads(d.manifest.read_text())
        listed, documents = list(manifest["shards"]), int(manifest["documents"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{d.manifest}: not a manifest written by `cm3leon prepare` "
                          f"({type(e).__name__}: {e})") from None
    present = sorted(p.name for p in d.documents.glob("shard-*.array_record"))
    missing, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if missing or extra:
        raise ConfigError(f"{d.documents}: " + "; ".join(
            [f"shard {n} of the manifest is missing" for n in missing[:3]]
            + [f"shard {n} is not in the manifest" for n in extra[:3]])
            + "; rerun `cm3leon prepare` into a fresh directory")
    total = 0
    for name in listed:
        path = d.documents / name
        try:
            count = len(grain.sources.ArrayRecordDataSource([str(path)]))
        except Exception as e:  # noqa: BLE001 - any reader failure: the shard is damaged
            raise ConfigError(f"{path}: unreadable shard ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
        counts = path.with_suffix(".json")
        said = json.loads(counts.read_text()).get("documents") if counts.exists() else count
        if said != count:
            raise ConfigError(f"{path}: {count} records but {counts.name} says {said}")
        total += count
    if total != documents:
        raise ConfigError(f"{d.manifest} says {documents} documents but the shards hold "
                          f"{total}")
    return total


def open_documents(data_dir: PathLike, check: bool = True):
    """Random access to every document by global index (a grain data source of bytes),
    after `check_documents` (`check=False` where the caller has checked the directory:
    the input pipeline's readers, once per process and worker)."""
    if check:
        check_documents(data_dir, "prepared directory")
    return grain.sources.ArrayRecordDataSource([str(p) for p in shard_paths(data_dir)])


def iter_documents(data_dir: PathLike) -> Iterator[dict]:
    source = open_documents(data_dir)
    for i in range(len(source)):
        yield decode_document(source[i])
