"""Prepared data directories and sources on cloud storage, against the GCS emulator of
conftest.py: `prepare` into `gs://` writes what it writes locally, training reads the
same batches from there, and the sources read files that live in a bucket."""

import json
import pickle

import numpy as np
import pytest
from conftest import CONFIGS
from test_pipeline import prepare as write_prepared
from test_prepare import VQ
from test_sources import make_jsonl, make_webdataset, records, write_parquet

from cm3leon_jax import storage
from cm3leon_jax.config import load_config
from cm3leon_jax.data import pipeline
from cm3leon_jax.data.prepare import open_prepared, prepare
from cm3leon_jax.data.records import (check_documents, iter_documents, open_documents,
                                      shard_paths)
from cm3leon_jax.data.sources import (JsonlSource, Pair, ParquetSource, SourceError,
                                      WebDatasetSource)
from cm3leon_jax.tokenizers.image import ImageTokenizer

SETTINGS = ["source.size=24", "prepare.shard_size=10", "prepare.batch_size=8",
            "prepare.workers=0", *VQ]


def make_bucket(emulator: str, name: str) -> str:
    import urllib.request  # the emulator's bucket API: these fixtures only

    req = urllib.request.Request(
        f"{emulator}/storage/v1/b?project=test", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).close()
    return f"gs://{name}"


def tree(root) -> dict[str, bytes]:
    """{path below root: bytes} of every file under `root`, local or remote."""
    root = storage.path(root)
    return {str(f.relative_to(root)): f.read_bytes() for f in storage.files(root)}


def without_paths_and_times(manifest: dict) -> dict:
    m = {k: v for k, v in manifest.items() if k not in ("seconds", "wall_seconds")}
    m["inputs"] = {**m["inputs"], "image_tokenizer": {
        k: v for k, v in m["inputs"]["image_tokenizer"].items() if k != "path"}}
    return m


@pytest.fixture(scope="module")
def prepared(gcs_emulator, tmp_path_factory):
    """The shapes source prepared locally (a local image tokenizer) and into a bucket (the
    same tokenizer copied into the bucket): (local dir, gs:// dir, both manifests, config
    overrides)."""
    bucket = make_bucket(gcs_emulator, "storage-data-prepared")
    tmp = tmp_path_factory.mktemp("prepared")
    vq = tmp / "vq"
    ImageTokenizer.create(load_config(CONFIGS / "tiny.yaml", VQ).vqgan, seed=0).save(vq)
    storage.copy(vq, f"{bucket}/tokenizers/vq")
    local, remote = tmp / "data", f"{bucket}/data"
    cfg = lambda out, tok: load_config(CONFIGS / "tiny.yaml", [
        f"data.dir={out}", f"prepare.image_tokenizer={tok}", *SETTINGS])
    m_local = prepare(cfg(local, vq), progress=False)
    m_remote = prepare(cfg(remote, f"{bucket}/tokenizers/vq"), progress=False)
    return local, remote, m_local, m_remote, cfg(remote, f"{bucket}/tokenizers/vq")


def test_prepare_into_a_bucket_writes_what_prepare_writes_locally(prepared):
    local, remote, m_local, m_remote, cfg = prepared
    assert (m_remote["documents"], m_remote["records"], len(m_remote["shards"])) == (24, 24, 3)
    given = m_remote["inputs"]["image_tokenizer"]
    assert given["path"] == "gs://storage-data-prepared/tokenizers/vq"
    assert given["digest"] == m_local["inputs"]["image_tokenizer"]["digest"]
    assert without_paths_and_times(m_remote) == without_paths_and_times(m_local)
    files_local, files_remote = tree(local), tree(remote)
    assert sorted(files_remote) == sorted(files_local) == [
        ".inputs.json", "documents/shard-00000-of-00003.array_record",
        "documents/shard-00000-of-00003.json", "documents/shard-00001-of-00003.array_record",
        "documents/shard-00001-of-00003.json", "documents/shard-00002-of-00003.array_record",
        "documents/shard-00002-of-00003.json", "image_tokenizer/vqgan.json",
        "image_tokenizer/vqgan.npz", "manifest.json", "skipped.jsonl",
        "text_tokenizer.model", "vocab.json"]
    for name, data in files_local.items():  # shards, tokenizers, vocab: byte for byte
        if name not in (".inputs.json", "manifest.json"):
            assert files_remote[name] == data, name
    assert json.loads(files_remote["manifest.json"]) == m_remote
    assert [str(p) for p in shard_paths(remote)] == [
        f"{remote}/documents/{name}" for name in m_remote["shards"]]
    assert check_documents(remote) == 24
    src_local, src_remote = open_documents(local), open_documents(remote)
    assert [src_remote[i] for i in range(24)] == [src_local[i] for i in range(24)]
    manifest, tokenizers = open_prepared(remote)
    assert manifest == m_remote and tokenizers.vocab == cfg.vocab.build()
    assert tokenizers.text.model_proto == (local / "text_tokenizer.model").read_bytes()

    # done: a rerun returns the manifest; an interrupted one (no manifest, shard 1 without
    # its counts) redoes shard 1 only and ends with the same bytes
    assert prepare(cfg, progress=False) == m_remote
    storage.path(f"{remote}/manifest.json").unlink()
    storage.path(f"{remote}/documents/shard-00001-of-00003.json").unlink()
    m_again = prepare(cfg, progress=False)
    assert {k: v for k, v in tree(remote).items() if k != "manifest.json"} == {
        k: v for k, v in files_remote.items() if k != "manifest.json"}
    assert without_paths_and_times(m_again) == without_paths_and_times(m_remote)


def test_training_reads_the_same_batches_from_a_bucket(prepared, gcs_emulator, tmp_path):
    local, remote, *_ = prepared
    overrides = [*SETTINGS, "train.batch_size=4", "data.seq_len=64", "model.max_seq_len=64"]

    def take(data_dir, n=6):
        cfg = load_config(CONFIGS / "tiny.yaml", [f"data.dir={data_dir}", *overrides])
        it = pipeline.batches(cfg, log=lambda *_: None)
        return [next(it) for _ in range(n)]

    want = take(local)
    assert len(want) == 6 and want[0]["inputs"].shape == (4, 64)
    for got, expected in zip(take(remote), want):
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])

    # a neighbors table in the bucket (read whole: no memory map there), k = 3
    bucket = make_bucket(gcs_emulator, "storage-data-neighbors")
    cfg = load_config(CONFIGS / "tiny.yaml")
    docs, table = write_prepared(tmp_path / "p", cfg)
    storage.copy(tmp_path / "p", f"{bucket}/p")
    k3 = lambda d: load_config(CONFIGS / "tiny.yaml", [f"data.dir={d}", "data.k=3"])
    assert pipeline.check_inputs(k3(f"{bucket}/p")) == pipeline.Inputs(
        len(docs), f"{bucket}/p/retrieval/neighbors.npy", 3, None)
    ex_local = pipeline.examples(k3(tmp_path / "p"))
    ex_remote = pipeline.examples(k3(f"{bucket}/p"))
    for i in range(20):
        a, b = ex_local[i], ex_remote[i]
        assert a["retrieved"] == b["retrieved"]
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(a[key], b[key])
    assert sum(ex_remote[i]["retrieved"] for i in range(20)) > 0


def test_sources_read_files_in_a_bucket(bucket, tmp_path):
    # jsonl: the file and its images in the bucket, the same records and skips
    (tmp_path / "jsonl").mkdir()
    path, bad = make_jsonl(tmp_path / "jsonl")
    storage.copy(tmp_path / "jsonl", f"{bucket}/jsonl")
    want, got = records(JsonlSource(str(path))), records(JsonlSource(f"{bucket}/jsonl/pairs.jsonl"))
    assert [r for r, _ in got] == [r for r, _ in want]
    assert {r: p[0] for r, p in got if not isinstance(p, Pair)} == bad
    for (_, a), (_, b) in zip(want, got):
        if isinstance(a, Pair):
            assert (b.id, b.caption, b.meta) == (a.id, a.caption, a.meta)
            np.testing.assert_array_equal(b.image, a.image)
    escape = f"{bucket}/jsonl/escape.jsonl"
    storage.path(escape).write_text(json.dumps({"image": "../other/a.png", "caption": "x"}))
    assert records(JsonlSource(escape))[0][1][0] == "bad_line"

    # webdataset: brace and glob patterns over shards in the bucket, the damage found
    # the same, the layout pickled along
    pattern, good, bad, meta = make_webdataset(tmp_path / "wds")
    storage.copy(tmp_path / "wds" / "shards", f"{bucket}/shards")
    want = records(WebDatasetSource(pattern))
    for remote in (f"{bucket}/shards/{{00000..00001}}.tar", f"{bucket}/shards/*.tar"):
        src = WebDatasetSource(remote)
        got = records(pickle.loads(pickle.dumps(src)))
        assert [r for r, _ in got] == [r for r, _ in want]
        for (_, a), (_, b) in zip(want, got):
            if isinstance(a, Pair):
                assert (b.id, b.caption) == (a.id, a.caption)
                assert b.meta == {**a.meta, "shard": a.meta["shard"].replace(
                    str(tmp_path / "wds"), bucket)}
                np.testing.assert_array_equal(b.image, a.image)
            else:
                assert b[0] == a[0] and b[1] == a[1].replace(str(tmp_path / "wds"), bucket)
    assert src.caption(1) == "ünïcode jpeg"
    listed = WebDatasetSource(remote)
    assert len(listed) == len(src)  # listed now, not read yet
    shard = storage.path(f"{bucket}/shards/00000.tar")  # rewritten after listing: refused
    shard.write_bytes(shard.read_bytes())
    with pytest.raises(SourceError, match="changed after prepare listed it"):
        listed[0]
    with pytest.raises(SourceError, match="matches no file"):
        WebDatasetSource(f"{bucket}/none/*.tar")[0]

    # parquet: row groups read from the object
    columns = {"jpg": [None, (tmp_path / "jsonl" / "a.png").read_bytes()],
               "caption": ["none", "png"]}
    write_parquet(tmp_path / "pq" / "part.parquet", columns, row_group_size=1)
    storage.copy(tmp_path / "pq", f"{bucket}/pq")
    want = records(ParquetSource(str(tmp_path / "pq" / "*.parquet")))
    got = records(ParquetSource(f"{bucket}/pq/*.parquet"))
    assert [r for r, _ in got] == [r for r, _ in want] == ["part/0", "part/1"]
    assert got[0][1][0] == "missing_file" and got[1][1].caption == "png"
    np.testing.assert_array_equal(got[1][1].image, want[1][1].image)


@pytest.mark.slow
def test_prepare_trains_its_tokenizers_into_a_bucket(bucket, tmp_path):
    """Both tokenizers trained by `prepare`, locally and into the bucket: the VQ-GAN's run
    is written locally and uploaded, its tokenizer moved into place."""
    train = ["vqgan_train.steps=2", "vqgan_train.batch_size=4", "vqgan_train.images=16",
             "vqgan_train.eval_images=4"]
    cfg = lambda out: load_config(CONFIGS / "tiny.yaml", [f"data.dir={out}", *SETTINGS, *train])
    m_local = prepare(cfg(tmp_path / "data"), progress=False)
    m_remote = prepare(cfg(f"{bucket}/data"), progress=False)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "wall_seconds")}
    assert strip(m_remote) == strip(m_local)
    files_local, files_remote = tree(tmp_path / "data"), tree(f"{bucket}/data")
    assert sorted(files_remote) == sorted(files_local)
    assert "image_tokenizer/vqgan.npz" in files_remote
    assert "image_tokenizer_training/reconstructions.png" in files_remote
    assert not any(k.startswith("image_tokenizer_training/image_tokenizer/") for k in files_remote)
    for name, data in files_local.items():
        if name not in ("manifest.json", "image_tokenizer_training/summary.json"):
            assert files_remote[name] == data, name


@pytest.mark.multiprocess
def test_prepare_reads_webdataset_shards_from_a_bucket_in_reader_processes(bucket, tmp_path):
    """Two reader processes get the pickled source with its listed layout and read the
    samples from the bucket: the same documents as from the local shards."""
    pattern, good, bad, meta = make_webdataset(tmp_path)
    storage.copy(tmp_path / "shards", f"{bucket}/shards")
    vq = tmp_path / "vq"
    ImageTokenizer.create(load_config(CONFIGS / "tiny.yaml", VQ).vqgan, seed=0).save(vq)
    cfg = lambda out, path, workers: load_config(CONFIGS / "tiny.yaml", [
        f"data.dir={out}", "source.kind=webdataset", f"source.path={path}", "source.size=null",
        f"prepare.image_tokenizer={vq}", "prepare.max_bad_fraction=0.6", "prepare.shard_size=4",
        "prepare.batch_size=2", f"prepare.workers={workers}", *VQ])
    m_local = prepare(cfg(tmp_path / "local", pattern, 0), progress=False)
    m_remote = prepare(cfg(f"{bucket}/data", f"{bucket}/shards/*.tar", 2), progress=False)
    assert (m_remote["records"], m_remote["documents"]) == (9, 4)
    assert m_remote["skipped"] == m_local["skipped"]
    docs = lambda d: [(x["id"], x["caption"], x["text"].tolist(), x["image"].tolist(),
                       x["pixels"].tobytes()) for x in iter_documents(d)]  # meta: the shard path
    assert docs(f"{bucket}/data") == docs(tmp_path / "local")
    assert [x[0] for x in docs(f"{bucket}/data")] == list(good)
