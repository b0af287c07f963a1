import gzip
import json

import numpy as np
import pytest
from scipy import ndimage

from cm3leon_jax.data.sources import (FASHION_MNIST_CLASSES, BadRecord, FashionMnistSource,
                                      JsonlSource, Pair, ShapesSource, TfdsSource, check_caption,
                                      to_rgb)
from cm3leon_jax.shapes.world import BACKGROUND, COLOURS, NUMBERS, SHAPES


def detect(image: np.ndarray) -> list[dict]:
    """A reference pixel detector: one 8-connected component per object, shape by geometry."""
    found = []
    for name, rgb in COLOURS.items():
        labels, n = ndimage.label((image == rgb).all(-1), structure=np.ones((3, 3)))
        for sl in ndimage.find_objects(labels):
            crop = labels[sl] > 0
            corners = [crop[0, 0], crop[0, -1], crop[-1, 0], crop[-1, -1]]
            if all(corners):
                shape = "square"
            elif corners == [False, False, True, True]:
                shape = "triangle"
            else:
                shape = "circle" if crop.mean() > 0.68 else "cross"
            found.append({"colour": name, "shape": shape,
                          "bbox": [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]})
    return sorted(found, key=lambda o: (o["bbox"][1], o["bbox"][0]))


@pytest.mark.parametrize("resolution", [24, 37, 64])
def test_pixels_match_ground_truth(resolution):
    src = ShapesSource(size=10**6, resolution=resolution, seed=3)
    rng = np.random.default_rng(resolution)
    for index in rng.integers(0, len(src), 60):
        pair = src[index]
        assert isinstance(pair, Pair) and pair.image.shape == (resolution, resolution, 3)
        assert pair.image.dtype == np.uint8
        meta = json.loads(json.dumps(pair.meta))  # JSON-serialisable as is
        objects = meta["objects"]
        assert meta["count"] == len(objects)
        palette = np.array([BACKGROUND, *COLOURS.values()])
        assert (pair.image[:, :, None] == palette).all(-1).any(-1).all()  # flat colours only
        want = sorted(({"colour": o["colour"], "bbox": o["bbox"]} for o in objects),
                      key=lambda o: (o["bbox"][1], o["bbox"][0]))
        got = detect(pair.image)
        assert [{"colour": o["colour"], "bbox": o["bbox"]} for o in got] == want
        if resolution >= 64:  # big enough for the geometry to tell the shapes apart
            by_box = {tuple(o["bbox"]): o["shape"] for o in got}
            assert [by_box[tuple(o["bbox"])] for o in objects] == [o["shape"] for o in objects]
        cell = resolution / 3
        for o in objects:  # each object stays inside its grid cell
            row, col = o["cell"]
            x0, y0, x1, y1 = o["bbox"]
            assert col * cell <= x0 < x1 <= (col + 1) * cell + 1e-9
            assert row * cell <= y0 < y1 <= (row + 1) * cell + 1e-9


def test_captions_name_everything():
    src = ShapesSource(size=500, resolution=32, seed=0, max_objects=4)
    counts = set()
    for i in range(len(src)):
        pair = src[i]
        objects = pair.meta["objects"]
        counts.add(len(objects))
        assert pair.caption.startswith(f"{NUMBERS[len(objects)]} shape")
        for o in objects:
            assert f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}" in pair.caption
        assert src.caption(i) == pair.caption
        assert pair.caption.isascii() and pair.caption == pair.caption.strip()
    assert counts == {1, 2, 3, 4}
    assert {o["shape"] for i in range(100) for o in src[i].meta["objects"]} == set(SHAPES)


def test_deterministic_random_access():
    a, b = ShapesSource(100, 32, seed=1), ShapesSource(100, 32, seed=1)
    for i in (99, 0, 57):  # any order, any instance: same record
        pa, pb = a[i], b[i]
        assert pa.id == pb.id == f"shapes-1-{i}" and pa.caption == pb.caption
        np.testing.assert_array_equal(pa.image, pb.image)
    other = ShapesSource(100, 32, seed=2)
    assert [a.caption(i) for i in range(20)] != [other.caption(i) for i in range(20)]
    with pytest.raises(IndexError):
        a[100]
    with pytest.raises(ValueError, match="resolution"):
        ShapesSource(10, resolution=8)


def test_grain_reads_a_source():
    import grain

    src = ShapesSource(20, 32, seed=5)
    ds = grain.MapDataset.source(src).map(lambda p: p.caption)
    assert list(ds) == [src.caption(i) for i in range(20)]


def test_bad_record_reason():
    e = BadRecord("missing_file", "rec-7", "x.png")
    assert (e.reason, e.record_id) == ("missing_file", "rec-7") and "rec-7" in str(e)
    with pytest.raises(ValueError):
        BadRecord("meh", "rec-7")


def test_caption_checks():
    assert check_caption("a red circle", "r0") == "a red circle"
    assert check_caption("ünï".encode(), "r1") == "ünï"
    for raw, reason in [(b"\xff\xfe bad", "bad_utf8"), ("", "empty_caption"),
                        (" \n\t", "empty_caption"), (None, "empty_caption")]:
        with pytest.raises(BadRecord) as e:
            check_caption(raw, "r9")
        assert (e.value.reason, e.value.record_id) == (reason, "r9")


def test_to_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert (to_rgb(gray, "g") == gray[:, :, None]).all() and to_rgb(gray, "g").shape == (5, 7, 3)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    alpha = rgba[:, :, 3:] / 255
    np.testing.assert_allclose(to_rgb(rgba, "a"), rgba[:, :, :3] * alpha + 255 * (1 - alpha),
                               atol=0.5)
    for bad, reason in [(np.zeros((5, 7, 2), np.uint8), "wrong_shape"),
                        (np.zeros((0, 7, 3), np.uint8), "wrong_shape"),
                        (np.zeros((5,), np.uint8), "wrong_shape"),
                        (np.zeros((5, 7, 3), np.float32), "wrong_mode")]:
        with pytest.raises(BadRecord) as e:
            to_rgb(bad, "x")
        assert e.value.reason == reason


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 5, 1], np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    src = FashionMnistSource(str(tmp_path), "test", size=5)
    assert len(src) == 5
    pair = src[1]
    assert pair.id == "fashion_mnist-test-1" and pair.caption == "an ankle boot"
    assert pair.meta["label"] == 9 and (pair.image == images[1][:, :, None]).all()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0" * 11))
    with pytest.raises(ValueError, match="train-images"):
        len(FashionMnistSource(str(tmp_path), "train"))
    with pytest.raises(ValueError, match="split"):
        FashionMnistSource(str(tmp_path), "valid")


def test_fashion_mnist_debian_files():
    """Needs Debian's dataset-fashion-mnist (`make install` puts it in place)."""
    train, test = FashionMnistSource(split="train"), FashionMnistSource(split="test")
    assert (len(train), len(test)) == (60000, 10000)
    labels = [test[i].meta["label"] for i in range(0, 10000, 97)]
    assert set(labels) == set(range(10))  # every class shows up
    pair = train[59999]
    assert pair.image.shape == (28, 28, 3) and pair.image.max() > 100
    assert pair.caption in FASHION_MNIST_CLASSES


def test_tfds_builder_prepared_locally(tmp_path):
    import PIL.Image
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6 + i, 9, 3), dtype=np.uint8) for i in range(5)]

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "img": tfds.features.Image(shape=(None, None, 3)),
                "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):  # PNG bytes through PIL: no TensorFlow needed
                yield i, {"img": PIL.Image.fromarray(image), "text": f"picture {i} ü"}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = TfdsSource("tiny_captions", "train", str(tmp_path), image_key="img", text_key="text")
    assert len(src) == 5
    captions = set()
    for i in (4, 0, 2, 1, 3):  # TFDS stores examples shuffled: match image to caption
        pair = src[i]
        assert pair.id == f"tiny_captions-train-{i}"
        k = int(pair.caption.split()[1])
        assert pair.caption == f"picture {k} ü"
        np.testing.assert_array_equal(pair.image, images[k])
        captions.add(pair.caption)
    assert len(captions) == 5
    with pytest.raises(KeyError, match="caption"):
        TfdsSource("tiny_captions", "train", str(tmp_path), image_key="img")[0]


def make_jsonl(tmp_path):
    """Three good pairs and one of each kind of bad record; returns (path, {id: reason})."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, mode, shape in [("a.png", "RGB", (12, 16, 3)), ("b.png", "L", (9, 9)),
                              ("c.png", "RGBA", (10, 10, 4)), ("cmyk.jpg", "CMYK", (8, 8, 4))]:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8),
                        mode if mode != "CMYK" else None).convert(mode).save(tmp_path / name)
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    lines = [json.dumps({"image": "a.png", "caption": "first"}),
             json.dumps({"image": "b.png", "caption": "second", "id": "custom-id"}),
             json.dumps({"image": "missing.png", "caption": "gone"}),
             json.dumps({"image": "truncated.png", "caption": "broken"}),
             json.dumps({"image": "cmyk.jpg", "caption": "cmyk"}),
             json.dumps({"image": "a.png", "caption": "   "}),
             "{not json",
             json.dumps({"image": "c.png", "caption": "third"})]
    data = "\n".join(lines).encode() + b'\n{"image": "a.png", "caption": "\xff"}\n'
    (tmp_path / "pairs.jsonl").write_bytes(data)
    bad = {"pairs-2": "missing_file", "pairs-3": "corrupt_image", "pairs-4": "wrong_mode",
           "pairs-5": "empty_caption", "pairs-6": "bad_line", "pairs-8": "bad_utf8"}
    return tmp_path / "pairs.jsonl", bad


def test_jsonl_good_and_bad_records(tmp_path):
    from PIL import Image

    path, bad = make_jsonl(tmp_path)
    src = JsonlSource(str(path))
    assert len(src) == 9
    a = src[0]
    assert (a.id, a.caption) == ("pairs-0", "first")
    np.testing.assert_array_equal(a.image, np.asarray(Image.open(tmp_path / "a.png")))
    b = src[1]
    assert b.id == "custom-id" and b.image.shape == (9, 9, 3)
    assert src[7].image.shape == (10, 10, 3) and src.caption(7) == "third"
    for i in range(len(src)):
        record_id = f"pairs-{i}"
        if record_id in bad:
            with pytest.raises(BadRecord) as e:
                src[i]
            assert (e.value.reason, e.value.record_id) == (bad[record_id], record_id)
    with pytest.raises(FileNotFoundError):
        len(JsonlSource(str(tmp_path / "nope.jsonl")))
