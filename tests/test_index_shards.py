"""The sharded ScaNN index (`retrieval.index_shards`): exact settings give the single
index's results, the merge is deterministic, the key is validated, one shard writes what the
single index always wrote, and `cm3leon neighbors` gets the same table from either."""

import json
from pathlib import Path

import numpy as np
import pytest

from cm3leon_jax.config import ConfigError, RetrievalConfig, load_config
from cm3leon_jax.data import records
from cm3leon_jax.retrieval import index, neighbors
from cm3leon_jax.vocab import Vocab

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _bank(n, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    return (unit_rows(centres[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, dim))),
            unit_rows(rng.normal(size=(40, dim))))


def _built(bank, path, **cfg):
    manifest = index.build_index(bank, path, RetrievalConfig(**cfg))
    return manifest, index.load_searcher(path)


def test_shard_ranges_are_even_and_contiguous():
    assert index.shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert index.shard_ranges(8, 1) == [(0, 8)]
    assert index.shard_ranges(1001, 4) == [(0, 250), (250, 500), (500, 750), (750, 1001)]


@pytest.mark.parametrize("settings", [
    {},  # every shard below exact_threshold: brute force
    {"exact_threshold": 300, "num_leaves": 4, "leaves_to_search": 4, "reorder": 2000},  # tree,
])  # every leaf searched and every point rescored: exact too
def test_sharded_search_equals_the_single_index_where_search_is_exact(tmp_path, settings):
    bank, queries = _bank(1001)
    _, single = _built(bank, tmp_path / "single", **settings)
    manifest, sharded = _built(bank, tmp_path / "sharded", index_shards=3, **settings)
    want_ids, want_scores = index.search(single, queries, 10)
    ids, scores = index.search(sharded, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    if settings:  # the tree's exact rescoring may differ from another build's in the last bit
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(ids, index.exact_search(queries, bank, 10)[0])
    kind = "tree_ah" if settings else "exact"
    assert manifest["kind"] == "sharded" and manifest["recall_at_10"] == 1.0
    assert [s["range"] for s in manifest["shards"]] == [[0, 333], [333, 667], [667, 1001]]
    assert {s["kind"] for s in manifest["shards"]} == {kind}
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "manifest.json", "shard-00000-of-00003", "shard-00001-of-00003", "shard-00002-of-00003"]
    # shards smaller than k: the global top k still comes out, -1 / -inf past the bank
    _, tiny = _built(bank[:7], tmp_path / "tiny", index_shards=3)
    ids, scores = index.search(tiny, queries, 10)
    np.testing.assert_array_equal(ids[:, :7], index.exact_search(queries, bank[:7], 7)[0])
    assert np.all(ids[:, 7:] == -1) and np.all(scores[:, 7:] == -np.inf)


def test_merge_breaks_ties_by_the_lower_id():
    ids = np.array([[7, 2, 9, -1, 4, 3]])
    scores = np.array([[0.5, 0.5, 0.7, -np.inf, 0.5, 0.1]], np.float32)
    got = index.merge(ids, scores, 4)
    np.testing.assert_array_equal(got[0], [[9, 2, 4, 7]])
    np.testing.assert_array_equal(got[1], np.float32([[0.7, 0.5, 0.5, 0.5]]))
    for perm in ([5, 4, 3, 2, 1, 0], [3, 0, 4, 1, 5, 2]):  # shards answering in any order
        np.testing.assert_array_equal(index.merge(ids[:, perm], scores[:, perm], 4)[0], got[0])
    np.testing.assert_array_equal(index.merge(ids, scores, 6)[0], [[9, 2, 4, 7, 3, -1]])


def test_copies_in_two_shards_come_out_lower_id_first(tmp_path):
    half, queries = _bank(200)
    _, sharded = _built(np.concatenate([half, half]), tmp_path / "i", index_shards=2)
    ids, scores = index.search(sharded, queries, 10)
    np.testing.assert_array_equal(ids[:, 0::2], index.exact_search(queries, half, 5)[0])
    np.testing.assert_array_equal(ids[:, 1::2], ids[:, 0::2] + 200)
    np.testing.assert_array_equal(scores[:, 1::2], scores[:, 0::2])


def test_index_shards_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"retrieval.index_shards=0 must be >= 1 \(1: one "
                                          "index over the whole bank\\)"):
        load_config(TINY, ["retrieval.index_shards=0"])
    with pytest.raises(ValueError, match="retrieval.index_shards=5 exceeds the bank's 4 "
                                         "documents"):
        index.build_index(_bank(4)[0], tmp_path / "i", RetrievalConfig(index_shards=5))


def test_one_shard_writes_what_the_single_index_wrote(tmp_path):
    bank, _ = _bank(500)
    manifest = index.build_index(bank, tmp_path / "index", RetrievalConfig())
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "dataset.npy", "manifest.json", "scann_assets.pbtxt", "scann_config.pb"]
    assert list(manifest) == ["kind", "size", "dim", "build_seconds", "recall_at_10",
                              "recall_queries"]
    assert json.loads((tmp_path / "index" / "manifest.json").read_text()) == manifest
    direct = tmp_path / "direct"
    direct.mkdir()
    index.build_searcher(bank, RetrievalConfig()).serialize(str(direct), relative_path=True)
    for f in direct.iterdir():
        assert (tmp_path / "index" / f.name).read_bytes() == f.read_bytes(), f.name
    tree = index.build_index(bank, tmp_path / "tree", RetrievalConfig(exact_threshold=100))
    assert list(tree)[:4] == ["kind", "num_leaves", "leaves_to_search", "reorder"]
    assert index.shard_count(tree) == 1 and "shards" not in tree


def test_neighbors_from_a_sharded_index_equal_the_single_index(tmp_path):
    data, n = tmp_path / "prep", 60
    vocab = Vocab(16, 16, 4)
    records.write_documents(data, [[{"id": str(i), "caption": "", "text": vocab.text_ids([i % 16]),
                                     "image": vocab.image_ids([i % 16])} for i in range(n)]])
    rng = np.random.default_rng(1)
    groups = rng.normal(size=(5, 16))
    (data / "embeddings").mkdir()
    for side in ("text", "image"):
        np.save(data / "embeddings" / f"{side}.npy",
                groups[np.arange(n) % 5] + 0.7 * rng.normal(size=(n, 16)))
    tables = []
    for shards in (1, 4):
        cfg = load_config(TINY, [f"data.dir={data}", f"retrieval.dir={tmp_path / str(shards)}",
                                 "retrieval.encoder=npy", "retrieval.query_text_dropout=0",
                                 f"retrieval.index_shards={shards}"])
        neighbors.build_bank_index(cfg)
        neighbors.compute_neighbors(cfg)
        out = tmp_path / str(shards)
        tables.append((np.load(out / "neighbors.npy"), np.load(out / "scores.npy")))
    np.testing.assert_array_equal(tables[1][0], tables[0][0])
    np.testing.assert_array_equal(tables[1][1], tables[0][1])
    stale = load_config(TINY, [f"data.dir={data}", f"retrieval.dir={tmp_path / '4'}",
                               "retrieval.encoder=npy", "retrieval.query_text_dropout=0"])
    with pytest.raises(ValueError, match="built in 4 shards, config has "
                                         "retrieval.index_shards=1; rerun `cm3leon index`"):
        neighbors.compute_neighbors(stale)


def test_a_sharded_index_on_gs_rebuilds_loads_and_searches_as_built(tmp_path, bucket):
    bank, queries = _bank(300)
    cfg = RetrievalConfig(index_shards=3)
    want = index.search(_built(bank, tmp_path / "local", index_shards=3)[1], queries, 10)
    index.build_index(bank[:150], f"{bucket}/index", RetrievalConfig())  # replaced below
    manifest = index.build_index(bank, f"{bucket}/index", cfg)
    assert index.shard_count(manifest) == 3
    got = index.search(index.load_searcher(f"{bucket}/index"), queries, 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
