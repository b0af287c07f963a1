import numpy as np
import pytest

import json

from cm3leon_jax.config import ConfigError
from cm3leon_jax.data.records import (check_documents, decode_document, encode_document,
                                      iter_documents, open_documents, shard_name, shard_paths,
                                      write_documents)


def doc(i, pixels=True):
    rng = np.random.default_rng(i)
    return {"id": f"doc-{i}", "caption": f"caption {i} é", "text": rng.integers(0, 99, i + 1),
            "image": rng.integers(100, 200, 16),
            "pixels": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) if pixels else None,
            "meta": '{"i": %d}' % i}


def test_round_trip_across_shards(tmp_path):
    docs = [doc(i, pixels=i % 2 == 0) for i in range(7)]
    assert write_documents(tmp_path, [docs[:4], docs[4:]]) == 7
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


def test_documents_are_held_to_the_manifest(tmp_path):
    """A deleted shard, a half-finished prepare, an edited manifest, a damaged shard: each
    refused before anything is read, naming the file."""
    write_documents(tmp_path, [[doc(i) for i in range(4)], [doc(i) for i in range(4, 9)]])
    assert check_documents(tmp_path) == 9
    manifest = tmp_path / "manifest.json"
    saved = manifest.read_text()

    edited = json.loads(saved)
    edited["documents"] = 8
    manifest.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=r"manifest.json says 8 documents but the shards hold 9"):
        open_documents(tmp_path)
    manifest.write_text(saved)

    counts = tmp_path / "documents" / shard_name(1, 2).replace(".array_record", ".json")
    counts.write_text(json.dumps({"documents": 4}))
    with pytest.raises(ConfigError, match=rf"{shard_name(1, 2)}: 5 records but .* says 4"):
        check_documents(tmp_path)
    counts.write_text(json.dumps({"documents": 5}))

    shard = tmp_path / "documents" / shard_name(1, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"{shard_name(1, 2)}: unreadable shard"):
        check_documents(tmp_path)
    shard.unlink()
    with pytest.raises(ConfigError, match=rf"shard {shard_name(1, 2)} of the manifest is missing"):
        check_documents(tmp_path, "data.dir")

    manifest.unlink()
    with pytest.raises(ConfigError, match=r"data.dir=.* has no manifest.json: not a finished"):
        check_documents(tmp_path, "data.dir")
