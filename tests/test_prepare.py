import json
import os

import numpy as np
import pytest
from conftest import CONFIGS
from test_sources import make_jsonl

from cm3leon_jax.config import load_config
from cm3leon_jax.data.prepare import PrepareError, open_prepared, prepare
from cm3leon_jax.data.records import iter_documents, shard_paths
from cm3leon_jax.data.sources import FashionMnistSource, ShapesSource, fit_image
from cm3leon_jax.tokenizers.image import ImageTokenizer

VQ = ["vqgan.resolution=24", "vqgan.base_channels=8", "vqgan.channel_mult=[1, 2]",
      "vqgan.num_res_blocks=1", "vqgan.mid_attn=false", "vqgan.norm_groups=4",
      "vqgan.z_channels=8", "vqgan.embed_dim=4", "vqgan.codebook_size=32", "vocab.image_size=32"]


def config(tiny, tmp_path, name, *overrides):
    return tiny(f"data.dir={tmp_path / name}", "prepare.workers=0", *VQ, *overrides)


@pytest.fixture(scope="module")
def random_vq(tmp_path_factory):
    """A real (untrained) image tokenizer for runs that test the data path, not its quality."""
    path = tmp_path_factory.mktemp("vq") / "tok"
    ImageTokenizer.create(load_config(CONFIGS / "tiny.yaml", VQ).vqgan, seed=0).save(path)
    return path


@pytest.mark.slow
def test_shapes_round_trip_and_idempotent_rerun(tiny, tmp_path):
    settings = ["source.size=40", "prepare.shard_size=16", "prepare.batch_size=8",
                "vqgan_train.steps=2", "vqgan_train.batch_size=4", "vqgan_train.images=16",
                "vqgan_train.eval_images=4"]
    cfg = config(tiny, tmp_path, "shapes", *settings)
    m = prepare(cfg, progress=False)  # trains both tokenizers
    out = tmp_path / "shapes"
    assert (m["documents"], m["records"], m["skipped"]) == (40, 40, {})
    assert m["shards"] == [p.name for p in shard_paths(out)] and len(m["shards"]) == 3
    manifest, p = open_prepared(out)
    assert manifest == m
    assert p.vocab == cfg.vocab.build() and m["vocab"] == p.vocab.to_json()
    image = p.image
    assert (image.resolution, image.codebook_size) == (24, 32)
    assert (out / "image_tokenizer_training" / "reconstructions.png").exists()
    src = ShapesSource(40, 24, seed=0)
    docs = list(iter_documents(out))
    assert [d["id"] for d in docs] == [src[i].id for i in range(40)]
    for i, d in enumerate(docs):
        pair = src[i]
        assert d["caption"] == pair.caption
        assert p.text.decode(p.vocab.to_piece_ids(d["text"])) == pair.caption
        np.testing.assert_array_equal(d["pixels"], pair.image)
        assert json.loads(d["meta"]) == pair.meta
    pixels = np.stack([d["pixels"] for d in docs])
    np.testing.assert_array_equal(np.stack([p.vocab.to_codes(d["image"]) for d in docs]),
                                  image.encode(pixels))

    before = {q: q.read_bytes() for q in shard_paths(out)}
    mtimes = {q: os.stat(q).st_mtime_ns for q in shard_paths(out)}
    assert prepare(cfg, progress=False) == m  # done: nothing rewritten
    assert {q: os.stat(q).st_mtime_ns for q in shard_paths(out)} == mtimes
    (out / "manifest.json").unlink()  # an interrupted run: shard 1 never finished
    shard1 = shard_paths(out)[1]
    shard1.with_suffix(".json").unlink()
    m2 = prepare(cfg, progress=False)
    assert {q: q.read_bytes() for q in shard_paths(out)} == before
    assert {q: os.stat(q).st_mtime_ns for q in shard_paths(out) if q != shard1} == {
        q: t for q, t in mtimes.items() if q != shard1}
    assert {k: v for k, v in m2.items() if "seconds" not in k} == {
        k: v for k, v in m.items() if "seconds" not in k}

    with pytest.raises(PrepareError, match=r"other inputs \(differs in \['source'\]\)"):
        prepare(config(tiny, tmp_path, "shapes", *settings, "source.seed=1"), False)


@pytest.mark.multiprocess
def test_bad_records_counted_and_workers_agree(tiny, tmp_path, random_vq):
    path, bad = make_jsonl(tmp_path)
    common = ["source.kind=jsonl", f"source.path={path}", "source.size=null",
              f"prepare.image_tokenizer={random_vq}", "prepare.max_bad_fraction=0.7"]
    m = prepare(config(tiny, tmp_path, "serial", *common), progress=False)
    want = {}
    for reason in bad.values():
        want[reason] = want.get(reason, 0) + 1
    assert m["skipped"] == dict(sorted(want.items())) and sum(want.values()) == 6
    assert (m["documents"], m["records"]) == (3, 9)
    logged = [json.loads(x) for x in (tmp_path / "serial" / "skipped.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in logged} == bad
    docs = list(iter_documents(tmp_path / "serial"))
    assert [(d["id"], d["caption"]) for d in docs] == [
        ("pairs-0", "first"), ("custom-id", "second"), ("pairs-7", "third")]
    assert all(d["pixels"].shape == (24, 24, 3) for d in docs)

    given = tmp_path / "serial" / "text_tokenizer.model"  # a given text tokenizer is used as is
    m2 = prepare(config(tiny, tmp_path, "parallel", *common, "prepare.workers=2",
                        "prepare.batch_size=2", f"prepare.text_tokenizer={given}"), progress=False)
    assert m2["skipped"] == m["skipped"]
    assert (tmp_path / "parallel" / "text_tokenizer.model").read_bytes() == given.read_bytes()
    for a, b in zip(shard_paths(tmp_path / "serial"), shard_paths(tmp_path / "parallel")):
        assert a.read_bytes() == b.read_bytes()

    with pytest.raises(PrepareError, match="6 of 9 records are bad"):
        prepare(config(tiny, tmp_path, "strict", *common, "prepare.max_bad_fraction=0.5"),
                progress=False)
    assert not (tmp_path / "strict" / "manifest.json").exists()
    assert len((tmp_path / "strict" / "skipped.jsonl").read_text().splitlines()) == 6
    with pytest.raises(PrepareError, match="6 of 9"):  # a re-run has no shard left, still fails
        prepare(config(tiny, tmp_path, "strict", *common, "prepare.max_bad_fraction=0.5"),
                progress=False)
    m3 = prepare(config(tiny, tmp_path, "strict", *common), progress=False)  # allowed now
    assert m3["skipped"] == m["skipped"] and m3["documents"] == 3


def test_fashion_mnist(tiny, tmp_path, random_vq):
    cfg = config(tiny, tmp_path, "fm", "source.kind=fashion_mnist", "source.size=20",
                 f"prepare.image_tokenizer={random_vq}")
    m = prepare(cfg, progress=False)
    assert (m["documents"], m["skipped"]) == (20, {})
    src = FashionMnistSource(size=20)
    text = open_prepared(tmp_path / "fm")[1].text
    for i, d in enumerate(iter_documents(tmp_path / "fm")):
        assert d["caption"] == src[i].caption == text.decode(d["text"] - cfg.vocab.build().text_offset)
        np.testing.assert_array_equal(d["pixels"], fit_image(src[i].image, 24))


def test_fit_image():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    out = fit_image(img, 10)  # short side to 10 (10 x 20), centre 10 columns: half red, half blue
    assert out.shape == (10, 10, 3)
    assert (out[:, :2] == (255, 0, 0)).all() and (out[:, 8:] == (0, 0, 255)).all()  # past ringing
    same = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    assert fit_image(same, 3) is same
    up = fit_image(np.full((7, 5, 3), 77, np.uint8), 16)
    assert up.shape == (16, 16, 3) and (up == 77).all()


def test_refuses_foreign_dir_and_missing_tokenizer(tiny, tmp_path, random_vq):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty"):
        prepare(config(tiny, tmp_path, "busy"), progress=False)
    with pytest.raises(PrepareError, match="prepare.text_tokenizer=.*does not exist"):
        prepare(config(tiny, tmp_path, "x", f"prepare.text_tokenizer={tmp_path}/none.model"),
                progress=False)
    with pytest.raises(FileNotFoundError, match="cm3leon prepare"):
        open_prepared(tmp_path / "busy")
    # a source that does not open claims nothing: the corrected rerun is not refused
    bad = config(tiny, tmp_path, "fixed", "source.kind=jsonl", f"source.path={tmp_path}/none.jsonl",
                 "source.size=8", f"prepare.image_tokenizer={random_vq}")
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        prepare(bad, progress=False)
    assert not (tmp_path / "fixed" / ".inputs.json").exists()
    prepare(config(tiny, tmp_path, "fixed", "source.size=8",
                   f"prepare.image_tokenizer={random_vq}"), progress=False)
    # a config that contradicts the given tokenizer is refused, not silently overridden
    with pytest.raises(PrepareError, match=r"has codebook_size 32 but vqgan.codebook_size is "
                                           r"64; set vqgan.\* to the tokenizer's"):
        prepare(config(tiny, tmp_path, "contradicted", "source.size=8", "vqgan.codebook_size=64",
                       f"prepare.image_tokenizer={random_vq}"), progress=False)


@pytest.mark.slow
def test_named_scenes_are_prepared_and_only_they_record_the_names(tiny, tmp_path, random_vq):
    """A directory prepared before named scenes existed (its inputs without `names`) still
    matches a config without them; a named one is prepared with its captions."""
    plain = config(tiny, tmp_path, "plain", "source.size=8", f"prepare.image_tokenizer={random_vq}")
    prepare(plain, progress=False)
    marker = tmp_path / "plain" / ".inputs.json"
    assert "names" not in json.loads(marker.read_text())["source"]
    prepare(plain, progress=False)  # the same inputs: nothing to redo
    named = config(tiny, tmp_path, "named", "source.size=8", "source.names=5",
                   f"prepare.image_tokenizer={random_vq}")
    prepare(named, progress=False)
    src = ShapesSource(8, 24, seed=0, max_objects=named.source.max_objects, names=5)
    assert [d["caption"] for d in iter_documents(tmp_path / "named")] == [
        src.caption(i) for i in range(8)]
    assert json.loads((tmp_path / "named" / ".inputs.json").read_text())["source"]["names"] == 5
