"""`retrieval.encoder: clip`, the paper's retriever: `index` and `neighbors` end to end with a
random CLIP, the stored vectors equal to CLIP's own embeddings, and retrieval at inference."""

import numpy as np
import pytest

from cm3leon_jax import cli
from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.data import records
from cm3leon_jax.perception.clip import embed_images, embed_texts
from cm3leon_jax.retrieval import embed
from cm3leon_jax.retrieval.encoders import make_encoder
from cm3leon_jax.layout import RetrievalDir
from cm3leon_jax.retrieval.query import Retriever
from test_clip import clip, hf  # noqa: F401 (fixtures)
from test_retrieval import TINY, write_prepared


def test_clip_encoder_index_neighbors_and_inference(hf, clip, tmp_path, capsys):  # noqa: F811
    data, bank, ret = tmp_path / "queries", tmp_path / "bank", tmp_path / "ret"
    bank_docs = write_prepared(bank, 48, seed=1, drop_image_every=7)
    write_prepared(data, 10, seed=2)
    overrides = [f"data.dir={data}", f"retrieval.bank={bank}", f"retrieval.dir={ret}",
                 "retrieval.encoder=clip", f"retrieval.clip={hf[0]}", "retrieval.embed_batch=16"]
    args = ["--config", str(TINY), *overrides]
    assert cli.main(["index", *args]) == 0
    assert cli.main(["neighbors", *args]) == 0
    out = capsys.readouterr().out
    assert "neighbors: 10 documents x text+image lists of 4;" in out
    ids = np.load(ret / "neighbors.npy")
    assert ids.shape == (10, 8) and ids.min() >= -1 and ids.max() < 48

    # the bank's vectors are CLIP's: unit mean of the caption's and the image's embeddings
    docs = list(records.iter_documents(bank))
    text = embed_texts(clip, [d["caption"] for d in docs])
    image = np.zeros_like(text)
    has = [i for i, d in enumerate(docs) if d["pixels"] is not None]
    image[has] = embed_images(clip, np.stack([docs[i]["pixels"] for i in has]))
    np.testing.assert_allclose(np.load(ret / "bank" / "vectors.npy"),
                               embed.document_vectors(text, image), atol=2e-5)

    # the encoder's token framing equals the tokenizer's own (<start> text <end>)
    cfg = load_config(TINY, overrides)
    enc = make_encoder(cfg.retrieval, RetrievalDir(ret))
    np.testing.assert_allclose(enc.embed_texts([enc.text_tokens(d) for d in docs[:6]]),
                               text[:6], atol=1e-6)

    # retrieval at inference embeds the caption string: the nearest bank text comes first
    retriever = Retriever(cfg)
    captions = [d["caption"] for d in bank_docs[:5]]
    found, scores = retriever.search(captions, [d["text"] for d in bank_docs[:5]], 3)
    want = np.argsort(-(embed_texts(clip, captions) @ np.load(ret / "bank" / "vectors.npy").T),
                      axis=1, kind="stable")[:, 0]
    np.testing.assert_array_equal(found[:, 0], want)


def test_clip_encoder_needs_its_directory():
    with pytest.raises(ConfigError, match=r"retrieval.encoder=clip with retrieval.clip=None"):
        load_config(TINY, ["retrieval.encoder=clip"])
    with pytest.raises(ConfigError, match=r"retrieval.encoder=builtin with retrieval.clip='/m'"):
        load_config(TINY, ["retrieval.clip=/m"])
