import numpy as np
import pytest

from cm3leon_jax.data.records import (decode_document, encode_document, iter_documents,
                                      open_documents, shard_name, shard_paths, write_shard)


def doc(i, pixels=True):
    rng = np.random.default_rng(i)
    return {"id": f"doc-{i}", "caption": f"caption {i} é", "text": rng.integers(0, 99, i + 1),
            "image": rng.integers(100, 200, 16),
            "pixels": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) if pixels else None,
            "meta": '{"i": %d}' % i}


def test_round_trip_across_shards(tmp_path):
    docs = [doc(i, pixels=i % 2 == 0) for i in range(7)]
    write_shard(tmp_path / "documents" / shard_name(1, 2), docs[4:])
    write_shard(tmp_path / "documents" / shard_name(0, 2), docs[:4])
    assert [p.name for p in shard_paths(tmp_path)] == [shard_name(0, 2), shard_name(1, 2)]
    assert len(open_documents(tmp_path)) == 7
    for want, got in zip(docs, iter_documents(tmp_path)):  # global index = shard order
        assert got["id"] == want["id"] and got["caption"] == want["caption"]
        assert got["meta"] == want["meta"]
        np.testing.assert_array_equal(got["text"], want["text"])
        assert got["text"].dtype == np.int32 and got["image"].dtype == np.int32
        if want["pixels"] is None:
            assert got["pixels"] is None
        else:
            np.testing.assert_array_equal(got["pixels"], want["pixels"])


def test_unknown_field_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown fields"):
        encode_document({**doc(0), "extra": 1})
    with pytest.raises(FileNotFoundError, match="no document shards"):
        shard_paths(tmp_path)
    assert decode_document(encode_document(doc(3)))["id"] == "doc-3"
