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
    records.write_documents(path, [docs[:half], docs[half:]])
    VOCAB.save(path / "vocab.json")
    return docs


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


# --- heuristics on constructed embeddings --------------------------------------------

def _unit(*parts):
    """A unit vector of 8 from (axis, coefficient) pairs, the last axis taking the rest."""
    x = np.zeros(8, np.float32)
    for axis, c in parts[:-1]:
        x[axis] = c
    x[parts[-1]] = np.sqrt(1 - np.sum(x * x))
    return x


def _bank():
    """Documents with known side cosines to the query document 0 (text e0, image e1)."""
    twin_image = _unit((1, 0.5), 4)
    close_to_twin = unit_rows((0.995 * twin_image + 0.0999 * np.eye(8)[6])[None])[0]
    texts = [_unit(0), _unit((0, 0.95), 2), _unit(0), _unit((0, 0.3), 5), _unit(0),
             _unit((0, 0.6), 5), _unit(0), np.zeros(8), np.zeros(8), _unit((0, 0.95), 2)]
    images = [_unit(1), _unit((1, 0.995), 3), twin_image, _unit(1), close_to_twin,
              _unit((1, 0.4), 6), np.zeros(8), np.zeros(8), _unit(1), np.zeros(8)]
    # 0 the document itself, 1 its duplicate (text 0.95, image 0.995), 2 the same caption
    # with another image (kept), 3 the same image with another caption, 4 the same caption
    # and the same image (0.995) as 2, 5 another document, 6 the caption alone (kept),
    # 7 never embedded, 8 the image alone, 9 a duplicate of 6 (text-only, 0.95)
    return neighbors.Sides(np.stack(texts).astype(np.float32),
                           np.stack(images).astype(np.float32))


CANDIDATES = np.array([[0, 1, 3, 8, 6, 2, 4, 5, 7]])  # best first
SCORES = np.array([[1.0, 0.95, 0.9, 0.89, 0.88, 0.85, 0.84, 0.7, 0.6]], np.float32)
PAIRS = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)


def _select(bank, query_self, pairs=PAIRS, before=None, **kw):
    r = RetrievalConfig(**{"pool": 2, **kw})
    return neighbors.select(np.array([query_self]), CANDIDATES, SCORES, bank.take([0]), bank,
                            pairs, r, before)


def test_duplicate_and_same_image_rules_on_constructed_sides():
    bank = _bank()
    dup = neighbors.duplicate(bank, bank, 0.9, 0.99)
    assert np.flatnonzero(dup[0]).tolist() == [0, 1]
    assert dup[2, 4] and dup[4, 2] and dup[6, 9] and not dup[2, 5] and not dup[7].any()
    assert not dup[0, 6] and not dup[0, 8]  # other sides: the caption or image alone
    assert not neighbors.duplicate(bank, bank, 0.9, 0.999)[0, 1]
    same = neighbors.same_image(bank, bank, 0.99)
    assert np.flatnonzero(same[0]).tolist() == [0, 1, 3, 8]


def test_heuristics_keep_same_caption_twins_and_skip_duplicates():
    bank = _bank()
    ids, scores, skipped = _select(bank, query_self=0)
    assert ids.tolist() == [[2, 5]]
    np.testing.assert_array_equal(scores, SCORES[:, [5, 7]])
    assert skipped == {"self": 1, "near_duplicate": 1, "same_image": 2,
                       "duplicate_of_chosen": 1, "empty": 1}
    # without self exclusion the document itself is a duplicate anyway
    ids, _, skipped = _select(bank, query_self=-1)
    assert ids.tolist() == [[2, 5]] and skipped["near_duplicate"] == 2
    # thresholds are configurable: at 0.999 the 0.995 images are other images
    ids, _, skipped = _select(bank, query_self=0, max_image_score=0.999)
    assert ids.tolist() == [[1, 2]] and skipped["same_image"] == 2
    ids, _, _ = _select(bank, query_self=0, prefer_pairs=False)
    assert ids.tolist() == [[6, 2]]
    # an earlier list chose 4: 4 itself may come again, 2 (its duplicate) may not
    ids, _, skipped = _select(bank, query_self=0, before=np.array([[4, -1]]))
    assert ids.tolist() == [[4, 5]] and skipped["duplicate_of_chosen"] == 1


def test_heuristics_prefer_pairs_and_fill_with_minus_one():
    bank = _bank()
    ids, scores, _ = _select(bank, query_self=0, pool=5)
    assert ids.tolist() == [[2, 5, 6, -1, -1]]  # pairs first; 4 duplicates the chosen 2
    assert np.all(scores[0, 3:] == -np.inf)
    pairs = PAIRS.copy()
    pairs[2] = False  # by these flags 2 is single-modality: 4 and 5 first
    ids, _, _ = _select(bank, query_self=0, pairs=pairs, pool=5)
    assert ids.tolist() == [[4, 5, 6, -1, -1]]


def test_heuristics_invariants_on_random_banks():
    rng = np.random.default_rng(0)
    r = RetrievalConfig(pool=3, max_text_score=0.9, max_image_score=0.97)
    for trial in range(20):
        classes = unit_rows(rng.normal(size=(4, 16)))
        label = rng.integers(0, 4, 60)
        text = classes[label].copy()  # class captions: every caption repeats
        image = unit_rows(classes[label] + 0.5 * rng.normal(size=(60, 16)))
        image[rng.integers(0, 60, 10)] = image[rng.integers(0, 60, 10)]  # repeated images
        text[rng.random(60) < 0.1] = 0
        image[rng.random(60) < 0.1] = 0
        bank = neighbors.Sides(text, image)
        vec = embed.document_vectors(text, image)
        pairs = (np.linalg.norm(text, axis=1) > 0) & (np.linalg.norm(image, axis=1) > 0)
        q = np.arange(20)
        cand, sc = index.exact_search(vec[q], vec, 15)
        ids, scores, _ = neighbors.select(q, cand, sc, bank.take(q), bank, pairs, r)
        for row, (i, s) in enumerate(zip(ids, scores)):
            got = i[i >= 0]
            assert got.tolist() == i[:len(got)].tolist()  # found ones first, then -1
            assert row not in got and len(set(got)) == len(got)
            me, chosen = bank.take([row]), bank.take(got)
            assert not neighbors.duplicate(me, chosen, 0.9, 0.97).any()
            assert not neighbors.same_image(me, chosen, 0.97).any()
            np.testing.assert_allclose(s[i >= 0], vec[got] @ vec[row], atol=1e-5)
            clash = neighbors.duplicate(chosen, chosen, 0.9, 0.97)
            clash |= neighbors.same_image(chosen, chosen, 0.97)
            assert not clash[~np.eye(len(got), dtype=bool)].any()
            flags = pairs[got]  # pairs come before any single-modality neighbor
            assert not np.any(~flags[:-1] & flags[1:])
        # same-caption twins are kept: every document with both sides fills its pool
        assert (ids[pairs[q]] >= 0).all()


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
               "retrieval.pool=3")
    manifest = neighbors.build_bank_index(cfg)
    assert manifest["kind"] == "exact" and manifest["recall_at_10"] == 1.0
    assert manifest["pairs"] == 32
    full = neighbors.compute_neighbors(cfg)
    out = tmp_path / "prep" / "retrieval"
    ids, scores = np.load(out / "neighbors.npy"), np.load(out / "scores.npy")
    assert ids.shape == (40, 6) and ids.dtype == np.int64 and scores.dtype == np.float32
    # the same table from the definition: a text-query and an image-query list, each exact
    # search + the heuristics; a document without an image has an empty image list
    sides = neighbors.Sides(embed.unit(text).astype(np.float32), embed.unit(image))
    vec = embed.document_vectors(sides.text, sides.image)
    pairs = np.array([bool(d["pixels"] is not None) for d in docs])
    want, want_s = [], []
    for query in (sides.text, sides.image):
        cand, sc = index.exact_search(embed.unit(query), vec, cfg.retrieval.candidates + 1)
        cand[np.linalg.norm(query, axis=1) == 0] = -1
        i, s, _ = neighbors.select(np.arange(40), cand, sc, sides, sides, pairs, cfg.retrieval,
                                   np.concatenate(want, 1) if want else None)
        want.append(i), want_s.append(s)
    np.testing.assert_array_equal(ids, np.concatenate(want, 1))
    np.testing.assert_allclose(scores, np.concatenate(want_s, 1), atol=1e-5)
    assert np.all(ids[::5, 3:] == -1) and np.all(ids[:, :3] >= 0)
    m = json.loads((out / "manifest.json").read_text())
    assert full["documents"] == 40 and m["lists"] == ["text", "image"] and m["pool"] == 3
    counts = [len(set(row[row >= 0])) for row in ids]
    assert m["fill"] == np.mean(np.array(counts) >= cfg.data.k)
    assert m["k_histogram"] == {str(c): counts.count(c) for c in sorted(set(counts))}
    assert m["empty_queries"] == {"text": 0, "image": 8}
    # three shards merge into the same table
    for s in (2, 0):
        neighbors.compute_neighbors(cfg, s, 3)
    with pytest.raises(FileNotFoundError, match="shard 1 of 3 has not been computed"):
        neighbors.merge_shards(cfg, 3)
    neighbors.compute_neighbors(_cfg(tmp_path, data, "retrieval.encoder=npy",
                                     "retrieval.query_text_dropout=0", "retrieval.pool=2"), 1, 3)
    with pytest.raises(ValueError, match=r"neighbors-00001-of-00003.npz: computed with lists "
                                         r"\['text', 'image'\] of 2, the config makes "
                                         r"\['text', 'image'\] of 3"):
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
    assert "exact over 64 documents x 16" in out
    assert "neighbors: 12 documents x text+image lists of 4;" in out
    ids = np.load(tmp_path / "ret" / "neighbors.npy")
    assert ids.shape == (12, 8) and ids.min() >= -1 and ids.max() < 64
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
    with pytest.raises(ConfigError, match="retrieval.candidates=1 is below retrieval.pool=4"):
        load_config(TINY, ["retrieval.candidates=1"])
    with pytest.raises(ConfigError, match="data.k=3 exceeds retrieval.pool=2"):
        load_config(TINY, ["retrieval.pool=2", "data.k=3"])
    with pytest.raises(ConfigError, match="retrieval.min_fill=1.5"):
        load_config(TINY, ["retrieval.min_fill=1.5"])
    with pytest.raises(ConfigError, match="retrieval.query=split needs an image encoder"):
        load_config(TINY, ["retrieval.encoder=minilm"])
    with pytest.raises(ConfigError, match="query_text_dropout=1.0"):
        load_config(TINY, ["retrieval.query_text_dropout=1.0"])
    with pytest.raises(ConfigError, match="minilm embeds text only"):
        load_config(TINY, ["retrieval.encoder=minilm", "retrieval.query=image"])
    with pytest.raises(ConfigError, match="cannot drop query tokens"):
        load_config(TINY, ["retrieval.encoder=npy"])
    with pytest.raises(ConfigError, match="retrieval.max_text_score=1.5"):
        load_config(TINY, ["retrieval.max_text_score=1.5"])
    with pytest.raises(ConfigError, match="unknown config key 'retrieval.knn'"):
        load_config(TINY, ["retrieval.knn=3"])
    with pytest.raises(ConfigError, match="data.dir is not set"):
        retrieval_dir(load_config(TINY, []))
