"""The JAX MiniLM against sentence-transformers (torch) and against stored reference values."""

import numpy as np
import pytest

from cm3leon_jax.retrieval import embed
from cm3leon_jax.retrieval.minilm import MiniLM, model_dir

SENTENCES = ["a red circle above a blue square", "A kitten sleeps on the sofa.",
             "A cat is lying on a couch.", "Interest rates rose again."]
# sentence-transformers 5 / torch 2.13 on this package's weights (computed once, stored)
FIRST_DIMS = [0.027996, 0.044047, -0.075431, 0.078362, -0.051303, 0.010034, 0.0357, 0.034465]
COSINES = [[1.0, -0.148655, -0.092242, 0.136547], [-0.148655, 1.0, 0.675961, -0.019721],
           [-0.092242, 0.675961, 1.0, -0.008406], [0.136547, -0.019721, -0.008406, 1.0]]


@pytest.fixture(scope="module")
def minilm():
    return MiniLM()


def _embed(m, sentences):
    return m.embed_texts([m.text_tokens({"caption": s}) for s in sentences])


def test_minilm_matches_stored_reference(minilm):
    v = _embed(minilm, SENTENCES)
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(v[0, :8], FIRST_DIMS, atol=1e-5)
    np.testing.assert_allclose(v @ v.T, COSINES, atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(model_dir()), device="cpu")
    sentences = [*SENTENCES, "x", "The quick brown fox jumps over the lazy dog, twice!"]
    want = ref.encode(sentences, convert_to_numpy=True)
    np.testing.assert_allclose(_embed(minilm, sentences), want, atol=1e-4)


def test_minilm_query_dropout_changes_tokens_not_shape(minilm):
    toks = minilm.text_tokens({"caption": SENTENCES[0]})
    assert len(toks) == 7
    long = minilm.text_tokens({"caption": " ".join(["retrieval"] * 300)})
    assert len(long) == 254  # max_seq_length 256 with [CLS] and [SEP], as sentence-transformers
    dropped = embed.drop_tokens(toks, 0.2, seed=0, index=0)
    assert len(dropped) == 6 and set(dropped) <= set(toks)
    full, part = minilm.embed_texts([toks, dropped])
    assert 0.5 < float(full @ part) < 1 - 1e-4
    with pytest.raises(ValueError, match="text only"):
        minilm.embed_images(np.zeros((1, 8, 8, 3), np.uint8))


def test_minilm_index_and_neighbors_end_to_end(tmp_path, minilm):
    from test_retrieval import TINY, write_prepared

    from cm3leon_jax.config import load_config
    from cm3leon_jax.retrieval import neighbors

    docs = write_prepared(tmp_path / "prep", 20)
    cfg = load_config(TINY, [f"data.dir={tmp_path / 'prep'}", "retrieval.encoder=minilm",
                             "retrieval.query=text", "retrieval.embed_batch=8"])
    assert neighbors.build_bank_index(cfg)["dim"] == 384
    bank = tmp_path / "prep" / "retrieval" / "bank"
    # text only: the document vector is the caption's MiniLM vector
    want = _embed(minilm, [d["caption"] for d in docs])
    np.testing.assert_allclose(np.load(bank / "vectors.npy"), want, atol=1e-5)
    assert not np.load(bank / "image.npy").any()
    m = neighbors.compute_neighbors(cfg)
    ids = np.load(tmp_path / "prep" / "retrieval" / "neighbors.npy")
    assert ids.shape == (20, 4) and m["skipped"]["self"] == 20
    assert all(i not in row for i, row in enumerate(ids.tolist()))
