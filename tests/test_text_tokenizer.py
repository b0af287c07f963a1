import json

import numpy as np
import pytest

from cm3leon_jax.data.sources import ShapesSource
from cm3leon_jax.tokenizers.text import TextTokenizer, train_text_tokenizer
from cm3leon_jax.vocab import Vocab


@pytest.fixture(scope="module")
def captions():
    src = ShapesSource(2000, 32, seed=0)
    return [src.caption(i) for i in range(len(src))]


@pytest.fixture(scope="module")
def tok(captions):
    return train_text_tokenizer(captions, 512)


def random_text(rng, n):
    alphabet = list("abcxyz ABC 0123456789 ,.:;!?-\t\n'\"") + list("éüßø日本語ё€😀\u0301")
    return "".join(rng.choice(alphabet, n))


def test_lossless_round_trips(tok, captions):
    assert 256 < tok.size <= 512
    for ids, text in zip(tok.encode_batch(captions), captions):
        assert ids.dtype == np.int32 and tok.decode(ids) == text
    rng = np.random.default_rng(0)
    for _ in range(300):  # unseen characters go through byte fallback, spaces are kept
        text = random_text(rng, int(rng.integers(1, 40)))
        np.testing.assert_array_equal(tok.encode(text), tok.encode_batch([text])[0])
        assert tok.decode(tok.encode(text)) == text


def test_words_become_few_pieces(tok, captions):
    # Each caption word is seen thousands of times: BPE keeps it whole (after its space).
    n_words = sum(len(c.split()) for c in captions[:100])
    n_pieces = sum(len(ids) for ids in tok.encode_batch(captions[:100]))
    assert n_pieces <= 1.3 * n_words


def test_deterministic_and_persistent(tok, captions, tmp_path):
    again = train_text_tokenizer(captions, 512)
    assert again.model_proto == tok.model_proto
    tok.save(tmp_path / "text.model")
    loaded = TextTokenizer.load(tmp_path / "text.model")
    assert [x.tolist() for x in loaded.encode_batch(captions[:50])] == [
        x.tolist() for x in tok.encode_batch(captions[:50])]
    with pytest.raises(FileNotFoundError):
        TextTokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        TextTokenizer.load(tmp_path / "junk.model")


def test_vocabulary_shift(tok, captions, tmp_path):
    vocab = Vocab(512, 64, 16)
    vocab.check_tokenizers(tok.size, 64)
    for text in captions[:50]:
        ids = vocab.text_ids(tok.encode(text))
        assert vocab.is_text(ids).all()
        assert tok.decode(vocab.to_piece_ids(ids)) == text
    assert tok.decode([tok.size + 3]) == tok.decode([0])  # spare text ids decode as <unk>
    with pytest.raises(ValueError, match="pieces"):
        Vocab(100, 64, 16).check_tokenizers(tok.size, 64)
    with pytest.raises(ValueError, match="codes"):
        vocab.check_tokenizers(tok.size, 32)
    vocab.save(tmp_path / "vocab.json", text_pieces=tok.size)
    assert Vocab.load(tmp_path / "vocab.json") == vocab
    assert json.loads((tmp_path / "vocab.json").read_text())["text_pieces"] == tok.size


def test_no_captions():
    with pytest.raises(ValueError, match="no captions"):
        train_text_tokenizer(["  "], 512)
