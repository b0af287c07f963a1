"""Retrieval: heuristics on constructed embeddings, query dropout, ScaNN vs exact search,
the encoders, and `index` + `neighbors` end to end on small prepared directories."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import cli
from cm3leon_jax.config import ConfigError, RetrievalConfig, load_config
from cm3leon_jax.data import records
from cm3leon_jax.layout import RetrievalDir, retrieval_dir
from cm3leon_jax.retrieval import embed, index, neighbors
from cm3leon_jax.retrieval.encoders import make_encoder
from cm3leon_jax.retrieval.train_encoder import contrastive_loss, load_encoder, pad_tokens
from cm3leon_jax.vocab import Vocab

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
VOCAB = Vocab(text_size=32, image_size=16, num_sentinels=4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "cross")
WORDS = ["a", "small", "big", *COLOURS, *SHAPES]


def scene(rng, size=16):
    """A coloured square or cross on grey; caption and ground truth."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    big = rng.random() < 0.5
    img = np.full((size, size, 3), 128, np.uint8)
    half = size // 4 + (size // 8 if big else 0)
    c = size // 2 + rng.integers(-2, 3, 2)
    box = (slice(c[0] - half, c[0] + half), slice(c[1] - half, c[1] + half))
    if shape == "square":
        img[box] = COLOURS[colour]
    else:
        img[c[0] - 1:c[0] + 1, box[1]] = COLOURS[colour]
        img[box[0], c[1] - 1:c[1] + 1] = COLOURS[colour]
    words = ["a", "big" if big else "small", colour, shape]
    return " ".join(words), img, {"colour": colour, "shape": shape}


def write_prepared(path, n, seed=0, drop_image_every=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        caption, img, meta = scene(rng)
        doc = {"id": f"d{i}", "caption": caption,
               "text": VOCAB.text_ids([WORDS.index(w) for w in caption.split()]),
               "image": VOCAB.image_ids(rng.integers(0, 16, 4)), "pixels": img,
               "meta": json.dumps(meta)}
        if drop_image_every and i % drop_image_every == 0:
            doc["image"], doc["pixels"] = [], None
        docs.append(doc)
    half = n // 2
    records.write_shard(path / "documents" / records.shard_name(0, 2), docs[:half])
    records.write_shard(path / "documents" / records.shard_name(1, 2), docs[half:])
    VOCAB.save(path / "vocab.json")
    return docs


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


# --- heuristics on constructed embeddings --------------------------------------------

def _bank():
    """Unit vectors with known cosines to the query e0 (and to each other)."""
    def v(c, j):  # cosine c to e0, the rest along axis j
        x = np.zeros(8, np.float32)
        x[0], x[j] = c, np.sqrt(1 - c * c)
        return x
    return np.stack([v(1.0, 1), v(0.95, 1), v(0.85, 2), v(0.84, 2), v(0.8, 3), v(0.7, 4)])


def _select(bank, pairs, query_self, **kw):
    r = RetrievalConfig(**{"k": 2, **kw})
    q = np.eye(8, dtype=np.float32)[:1]
    ids, scores = index.exact_search(q, bank, len(bank))
    return neighbors.select(np.array([query_self]), ids, scores, bank, pairs, r)


def test_heuristics_self_near_duplicate_and_duplicate_of_chosen():
    bank = _bank()
    pairs = np.ones(len(bank), bool)
    ids, scores, skipped = _select(bank, pairs, query_self=0)
    # 0 is the query itself, 1 scores 0.95 > 0.9, 3 is a duplicate of 2 (cos > 0.99)
    assert ids.tolist() == [[2, 4]]
    np.testing.assert_allclose(scores, [[0.85, 0.8]], atol=1e-6)
    assert skipped == {"self": 1, "near_duplicate": 1, "duplicate_of_chosen": 1, "empty": 0}
    # without self exclusion the document itself (score 1.0) is a near duplicate anyway
    ids, _, skipped = _select(bank, pairs, query_self=-1)
    assert ids.tolist() == [[2, 4]] and skipped["near_duplicate"] == 2
    # thresholds are configurable: with 0.99 the 0.95 candidate is kept
    ids, _, _ = _select(bank, pairs, query_self=0, max_score=0.99)
    assert ids.tolist() == [[1, 2]]


def test_heuristics_prefer_pairs_and_fill_with_minus_one():
    bank = _bank()
    pairs = np.array([1, 1, 0, 1, 0, 1], bool)
    ids, _, _ = _select(bank, pairs, query_self=0)
    assert ids.tolist() == [[3, 5]]  # pairs first (3 and 5), single-modality 2, 4 after
    ids, _, _ = _select(bank, pairs, query_self=0, prefer_pairs=False)
    assert ids.tolist() == [[2, 4]]
    ids, scores, _ = _select(bank, pairs, query_self=0, k=5)
    assert ids.tolist() == [[3, 5, 4, -1, -1]]  # 2 duplicates the chosen 3
    assert np.all(scores[0, 3:] == -np.inf)
    zero = bank.copy()
    zero[3] = 0  # an unembedded document is never chosen
    ids, _, skipped = _select(zero, pairs, query_self=0)
    assert 3 not in ids and skipped["empty"] == 1


def test_heuristics_invariants_on_random_banks():
    rng = np.random.default_rng(0)
    r = RetrievalConfig(k=3, max_score=0.9, max_pair_score=0.8)
    for trial in range(20):
        base = rng.normal(size=(6, 16))
        bank = unit_rows(base[rng.integers(0, 6, 60)] + 0.4 * rng.normal(size=(60, 16)))
        pairs = rng.random(60) < 0.5
        q = np.arange(20)
        cand, sc = index.exact_search(bank[q], bank, 15)
        ids, scores, _ = neighbors.select(q, cand, sc, bank, pairs, r)
        for row, (i, s) in enumerate(zip(ids, scores)):
            got = i[i >= 0]
            assert row not in got and len(set(got)) == len(got)
            assert np.all(s[i >= 0] <= 0.9)
            np.testing.assert_allclose(s[i >= 0], bank[got] @ bank[row], atol=1e-5)
            sims = bank[got] @ bank[got].T
            assert np.all(sims[~np.eye(len(got), dtype=bool)] <= 0.8 + 1e-6)
            if pairs[got].any():  # pairs come before any single-modality neighbor
                flags = pairs[got]
                assert not np.any(~flags[:-1] & flags[1:])


def test_query_dropout_is_exact_and_deterministic_by_seed():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 10, 37):
        toks = rng.integers(100, 200, n).astype(np.int32)
        a = embed.drop_tokens(toks, 0.2, seed=3, index=7)
        assert len(a) == n - min(round(0.2 * n), n - 1)
        np.testing.assert_array_equal(a, embed.drop_tokens(toks, 0.2, seed=3, index=7))
        pos = [int(np.flatnonzero(toks == t)[0]) for t in a] if len(set(toks)) == n else None
        if pos is not None:
            assert pos == sorted(pos)  # order preserved
    toks = np.arange(40, dtype=np.int32)
    variants = {tuple(embed.drop_tokens(toks, 0.2, seed=s, index=0)) for s in range(10)}
    assert len(variants) == 10  # the seed changes which tokens go
    assert tuple(embed.drop_tokens(toks, 0.2, 0, 1)) != tuple(embed.drop_tokens(toks, 0.2, 0, 2))
    np.testing.assert_array_equal(embed.drop_tokens(toks, 0.0, 0, 0), toks)


def test_document_vector_is_unit_mean_of_unit_sides():
    rng = np.random.default_rng(2)
    t, i = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    t[1], i[2], t[3], i[3] = 0, 0, 0, 0
    v = embed.document_vectors(t, i)
    tn, im = unit_rows(t[[0, 4]]), unit_rows(i[[0, 4]])
    np.testing.assert_allclose(v[[0, 4]], unit_rows(tn + im), atol=1e-6)
    np.testing.assert_allclose(v[1], unit_rows(i[1:2])[0], atol=1e-6)
    np.testing.assert_allclose(v[2], unit_rows(t[2:3])[0], atol=1e-6)
    assert not v[3].any()


# --- ScaNN against exact search ------------------------------------------------------

def test_scann_agrees_with_exact_search_on_a_small_bank():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    bank = unit_rows(centres[rng.integers(0, 20, 3000)] + 0.5 * rng.normal(size=(3000, 32)))
    q = unit_rows(rng.normal(size=(50, 32)))
    truth_ids, truth_scores = index.exact_search(q, bank, 10)
    # brute force (banks under exact_threshold) is exact
    s = index.build_searcher(bank, RetrievalConfig())
    ids, scores = index.search(s, q, 10)
    np.testing.assert_array_equal(ids, truth_ids)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    # tree + AH + reorder over every leaf and every point is exact too
    r = RetrievalConfig(exact_threshold=1000, num_leaves=8, leaves_to_search=8, reorder=3000)
    assert index.plan(len(bank), r)["kind"] == "tree_ah"
    ids, scores = index.search(index.build_searcher(bank, r), q, 10)
    np.testing.assert_array_equal(ids, truth_ids)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    assert index.plan(len(bank), RetrievalConfig(exact_threshold=1000))["num_leaves"] == 55
    assert index.recall_at(ids, truth_ids) == 1.0
    # a bank smaller than k: the missing places are -1 / -inf
    ids, scores = index.search(index.build_searcher(bank[:4], RetrievalConfig()), q[:3], 6)
    np.testing.assert_array_equal(ids[:, :4], index.exact_search(q[:3], bank[:4], 4)[0])
    assert np.all(ids[:, 4:] == -1) and np.all(scores[:, 4:] == -np.inf)
    # duplicated vectors: any of the tied ids is a correct answer
    dup = np.repeat(bank[:40], 3, axis=0)
    _, tie_scores = index.exact_search(dup[:10], dup, 10)
    shifted = index.exact_search(dup[:10], dup, 10)[0] // 3 * 3 + 2  # other copies
    assert index.recall_with_ties(dup[:10], dup, shifted, tie_scores) == 1.0
    assert index.recall_with_ties(dup[:10], dup, np.full((10, 10), -1), tie_scores) == 0.0
    assert index.recall_with_ties(dup[:10], dup, (shifted + 3) % 120, tie_scores) < 0.5


def test_exact_search_matches_full_sort():
    rng = np.random.default_rng(4)
    bank, q = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(7, 8))
    ids, scores = index.exact_search(q.astype(np.float32), bank, 12, block=3)
    full = np.argsort(-(q.astype(np.float32) @ bank.T), axis=1)[:, :12]
    np.testing.assert_array_equal(ids, full)
    ids, _ = index.exact_search(q.astype(np.float32), bank[:5], 12)
    assert ids.shape == (7, 5)


# --- end to end ----------------------------------------------------------------------

def _cfg(tmp_path, data, *extra):
    return load_config(TINY, [f"data.dir={data}", *extra])


def test_npy_encoder_index_and_sharded_neighbors(tmp_path):
    data = tmp_path / "prep"
    docs = write_prepared(data, 40, drop_image_every=5)
    rng = np.random.default_rng(5)
    groups = rng.normal(size=(4, 16))
    g = rng.integers(0, 4, 40)
    text = groups[g] + 0.6 * rng.normal(size=(40, 16))
    image = groups[g] + 0.6 * rng.normal(size=(40, 16))
    image[::5] = 0  # the documents without an image
    (data / "embeddings").mkdir()
    np.save(data / "embeddings" / "text.npy", text)
    np.save(data / "embeddings" / "image.npy", image)
    cfg = _cfg(tmp_path, data, "retrieval.encoder=npy", "retrieval.query_text_dropout=0",
               "retrieval.k=3")
    manifest = neighbors.build_bank_index(cfg)
    assert manifest["kind"] == "exact" and manifest["recall_at_10"] == 1.0
    assert manifest["pairs"] == 32
    full = neighbors.compute_neighbors(cfg)
    out = tmp_path / "prep" / "retrieval"
    ids, scores = np.load(out / "neighbors.npy"), np.load(out / "scores.npy")
    assert ids.shape == (40, 3) and ids.dtype == np.int64 and scores.dtype == np.float32
    # the same table from the definition: exact search + the heuristics
    vec = embed.document_vectors(embed.unit(text), embed.unit(image))
    cand, sc = index.exact_search(vec, vec, cfg.retrieval.candidates + 1)
    want, want_s, _ = neighbors.select(np.arange(40), cand, sc, vec,
                                       np.array([bool(d["pixels"] is not None) for d in docs]),
                                       cfg.retrieval)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    assert full["documents"] == 40 and json.loads((out / "manifest.json").read_text())["k"] == 3
    # three shards merge into the same table
    for s in (2, 0):
        neighbors.compute_neighbors(cfg, s, 3)
    with pytest.raises(FileNotFoundError, match="shard 1 of 3 has not been computed"):
        neighbors.merge_shards(cfg, 3)
    neighbors.compute_neighbors(cfg, 1, 3)
    neighbors.merge_shards(cfg, 3)
    np.testing.assert_array_equal(np.load(out / "neighbors.npy"), ids)
    np.testing.assert_array_equal(np.load(out / "scores.npy"), scores)


def test_npy_encoder_rejects_bad_files(tmp_path):
    data = tmp_path / "prep"
    write_prepared(data, 10)
    cfg = _cfg(tmp_path, data, "retrieval.encoder=npy", "retrieval.query_text_dropout=0")
    with pytest.raises(FileNotFoundError, match="text.npy"):
        neighbors.build_bank_index(cfg)
    (data / "embeddings").mkdir()
    np.save(data / "embeddings" / "text.npy", np.ones((9, 4)))
    np.save(data / "embeddings" / "image.npy", np.ones((10, 4)))
    with pytest.raises(ValueError, match=r"text.npy: shape \(9, 4\), expected \[10"):
        neighbors.build_bank_index(cfg)
    with pytest.raises(FileNotFoundError, match="no index"):
        neighbors.compute_neighbors(cfg)


@pytest.mark.slow
def test_builtin_encoder_trains_and_serves_the_cli(tmp_path, capsys):
    data, bank = tmp_path / "queries", tmp_path / "bank"
    write_prepared(bank, 64, seed=1)
    write_prepared(data, 12, seed=2)
    args = ["--config", str(TINY), f"data.dir={data}", f"retrieval.bank={bank}",
            f"retrieval.dir={tmp_path / 'ret'}", "retrieval.train_steps=3",
            "retrieval.train_batch_size=16", "retrieval.embed_batch=16", "retrieval.width=32",
            "retrieval.embed_dim=16", "retrieval.text_layers=1", "mesh.fsdp=-1"]
    # train on the bank's pairs (8 devices: the batch is split over fsdp)
    train_args = [a.replace(f"data.dir={data}", f"data.dir={bank}") for a in args]
    assert cli.main(["retrieval", "train-encoder", *train_args]) == 0
    info = json.loads((tmp_path / "ret" / "encoder" / "encoder.json").read_text())
    assert info["mesh"]["fsdp"] == 8 and info["steps"] == 3
    assert cli.main(["index", *args]) == 0
    assert cli.main(["neighbors", *args]) == 0
    out = capsys.readouterr().out
    assert "exact over 64 documents x 16" in out and "neighbors: 12 documents x k=2" in out
    ids = np.load(tmp_path / "ret" / "neighbors.npy")
    assert ids.shape == (12, 2) and ids.min() >= -1 and ids.max() < 64
    # the stored bank vectors are the loaded encoder's, recomputed another way
    enc = make_encoder(_cfg(tmp_path, data).retrieval, RetrievalDir(tmp_path / "ret"))
    docs = list(records.iter_documents(bank))[:5]
    t = enc.embed_texts([enc.text_tokens(d) for d in docs])
    i = enc.embed_images(np.stack([d["pixels"] for d in docs]))
    np.testing.assert_allclose(np.load(tmp_path / "ret" / "bank" / "vectors.npy")[:5],
                               embed.document_vectors(t, i), atol=1e-5)
    # padding rows of a batch do not change the vectors
    small = load_encoder(tmp_path / "ret" / "encoder", batch=2)
    np.testing.assert_allclose(small.embed_texts([enc.text_tokens(d) for d in docs]), t,
                               atol=1e-5)
    np.testing.assert_allclose(small.embed_images(np.stack([d["pixels"] for d in docs])), i,
                               atol=1e-5)
    # the loss is symmetric InfoNCE over the batch
    tok = pad_tokens([enc.text_tokens(d) for d in docs])
    pix = np.stack([d["pixels"] for d in docs])
    model = nnx.merge(small.graphdef, small.params)
    loss, acc = contrastive_loss(model, tok, pix, 0.1)
    logits = np.asarray(model.embed_texts(tok) @ model.embed_images(pix).T) / 0.1
    ce = lambda z: np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))
    np.testing.assert_allclose(float(loss), (ce(logits) + ce(logits.T)) / 2, rtol=1e-5)
    assert np.float32(acc) == np.float32(np.mean(np.argmax(logits, 1) == np.arange(5)))
    # the query vector drops 20% of the text, deterministically: rerunning gives the same
    first = np.load(tmp_path / "ret" / "scores.npy")
    assert cli.main(["neighbors", *args]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "ret" / "scores.npy"), first)
    # an encoder changed after `index` is refused (its queries would not match the bank)
    params = tmp_path / "ret" / "encoder" / "params.npz"
    with np.load(params) as z:
        changed = {k: 2 * z[k] for k in z.files}
    np.savez(params, **changed)
    with pytest.raises(ValueError, match="rerun `cm3leon index`"):
        neighbors.compute_neighbors(_cfg(tmp_path, data, f"retrieval.bank={bank}",
                                         f"retrieval.dir={tmp_path / 'ret'}"))
    # so is a bank other than the one indexed
    with pytest.raises(ValueError, match="indexes the bank .* the config's bank is"):
        neighbors.compute_neighbors(_cfg(tmp_path, data, f"retrieval.dir={tmp_path / 'ret'}"))


def test_retrieval_config_is_validated():
    with pytest.raises(ConfigError, match="retrieval.candidates=1 is below retrieval.k=2"):
        load_config(TINY, ["retrieval.candidates=1"])
    with pytest.raises(ConfigError, match="query_text_dropout=1.0"):
        load_config(TINY, ["retrieval.query_text_dropout=1.0"])
    with pytest.raises(ConfigError, match="minilm embeds text only"):
        load_config(TINY, ["retrieval.encoder=minilm", "retrieval.query=image"])
    with pytest.raises(ConfigError, match="cannot drop query tokens"):
        load_config(TINY, ["retrieval.encoder=npy"])
    with pytest.raises(ConfigError, match="retrieval.max_score=1.5"):
        load_config(TINY, ["retrieval.max_score=1.5"])
    with pytest.raises(ConfigError, match="unknown config key 'retrieval.knn'"):
        load_config(TINY, ["retrieval.knn=3"])
    with pytest.raises(ConfigError, match="data.dir is not set"):
        retrieval_dir(load_config(TINY, []))
