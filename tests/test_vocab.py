import numpy as np
import pytest

from cm3leon_jax.vocab import BREAK, EOS, EOSS, PAD, UNK, Vocab


def test_paper_layout():
    v = Vocab(56320, 8192, 512)
    assert (PAD, EOS, BREAK, EOSS, UNK) == (0, 1, 2, 3, 4)
    assert v.sentinel(0) == 5 and v.sentinel(511) == 516
    assert v.text_offset == 517 and v.image_offset == 517 + 56320
    assert v.used_size == 65029 and v.size == 65152 and v.size % 128 == 0


def test_ranges_partition_the_used_ids():
    v = Vocab(100, 50, 7)
    ids = np.arange(v.size)
    kinds = np.stack([v.is_special(ids), v.is_sentinel(ids), v.is_text(ids), v.is_image(ids)])
    assert (kinds.sum(0)[: v.used_size] == 1).all()  # every used id is exactly one kind
    assert (kinds.sum(0)[v.used_size:] == 0).all()  # padding rows are none
    assert [v.token_name(i) for i in (0, 2, 5, 12, 111, 112, v.used_size)] == [
        "<pad>", "<break>", "<mask:0>", "<text:0>", "<text:99>", "<image:0>", "<unused>"]


def test_round_trips():
    v = Vocab(100, 50, 7)
    rng = np.random.default_rng(0)
    pieces, codes = rng.integers(0, 100, 1000), rng.integers(0, 50, 1000)
    assert (v.to_piece_ids(v.text_ids(pieces)) == pieces).all()
    assert (v.to_codes(v.image_ids(codes)) == codes).all()
    with pytest.raises(ValueError):
        v.text_ids([100])
    with pytest.raises(ValueError):
        v.image_ids([-1])
    with pytest.raises(ValueError):
        v.to_codes(v.text_ids([3]))
    with pytest.raises(ValueError):
        v.sentinel(7)


def test_save_load(tmp_path):
    v = Vocab(300, 64, 16)
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == v
