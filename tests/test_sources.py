import collections
import gzip
import io
import json
import pickle
import re
import tarfile

import numpy as np
import pytest
from conftest import CONFIGS
from scipy import ndimage

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.data import sources
from cm3leon_jax.data.sources import (FASHION_MNIST_CLASSES, BadRecord, FashionMnistSource,
                                      JsonlSource, Pair, ParquetSource, ShapesSource,
                                      SourceError, TfdsSource, WebDatasetSource, check_caption,
                                      open_source, source_files, to_rgb)
from cm3leon_jax.shapes.world import (BACKGROUND, COLOURS, NUMBERS, SHAPES, entity_name,
                                      shapes_caption, zipf_weights)


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


def test_named_scenes_show_their_name_and_follow_zipf():
    """A named scene shows its name's objects (shape, colour, size, cell), whatever the seed,
    placed anew; its caption is the name only, and `describe` turns the name back into the
    scene's description."""
    names, zipf = 50, 1.0
    a = ShapesSource(3000, 32, seed=0, max_objects=2, names=names, zipf=zipf)
    b = ShapesSource(100, 32, seed=1, max_objects=2, names=names, zipf=zipf)
    seen, centres = {}, collections.defaultdict(set)
    for src in (a, b):
        for i in range(len(src)):
            pair = src[i]
            word = pair.caption.split()[1]
            assert pair.caption == f"a {word}" and word.isalpha()
            assert src.describe(pair.caption) == shapes_caption(pair.meta["objects"])
            what = [(o["shape"], o["colour"], o["size"], tuple(o["cell"]))
                    for o in pair.meta["objects"]]
            assert seen.setdefault(word, what) == what
            centres[word].add(tuple(pair.meta["objects"][0]["center"]))
    assert max(len(c) for c in centres.values()) > 1  # each scene places the objects anew
    assert len({entity_name(r) for r in range(70 ** 3 + 100)}) == 70 ** 3 + 100
    counts = collections.Counter(a.caption(i) for i in range(len(a)))
    expected = zipf_weights(names, zipf) * len(a)
    for rank in (0, 1, 9):  # the head of the distribution, within 4 binomial deviations
        n = counts[f"a {entity_name(rank)}"]
        assert abs(n - expected[rank]) < 4 * np.sqrt(expected[rank])
    assert a.describe("a red thing") == "a red thing"  # not a name: left as it is
    assert ShapesSource(10, 32).describe(a.caption(0)) == a.caption(0)  # a world without names
    with pytest.raises(ConfigError, match=r"source.names=5: named scenes are the shapes world's; "
                                          r"source.kind is 'fashion_mnist'"):
        load_config(CONFIGS / "tiny.yaml", ["source.kind=fashion_mnist", "source.names=5"])
    with pytest.raises(ConfigError, match=r"source.zipf"):
        load_config(CONFIGS / "tiny.yaml", ["source.names=5", "source.zipf=-1"])


def test_named_scenes_without_jitter_are_the_same_pixels_every_time():
    """source.name_jitter=false: every scene of a name is the same picture, whatever the
    scene's index or seed; the name's objects (and the captions) are the jittered world's."""
    fixed = [ShapesSource(600, 32, seed=s, max_objects=2, names=20, zipf=1.0, name_jitter=False)
             for s in (0, 1)]
    moved = ShapesSource(600, 32, seed=0, max_objects=2, names=20, zipf=1.0)
    pictures, differ = {}, 0
    for src in fixed:
        for i in range(len(src)):
            pair = src[i]
            np.testing.assert_array_equal(pictures.setdefault(pair.caption, pair.image),
                                          pair.image)
    for i in range(len(moved)):
        pair, still = moved[i], fixed[0][i]
        assert pair.caption == still.caption
        assert [(o["shape"], o["colour"], o["size"], o["cell"]) for o in pair.meta["objects"]] \
            == [(o["shape"], o["colour"], o["size"], o["cell"]) for o in still.meta["objects"]]
        differ += not np.array_equal(pair.image, still.image)
    assert differ > len(moved) // 2  # the jittered world moves them
    with pytest.raises(ConfigError, match=r"source.name_jitter=false: .* source.names is 0"):
        load_config(CONFIGS / "tiny.yaml", ["source.name_jitter=false"])


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


def test_jsonl_converts_palette_and_grey_alpha_and_stays_in_its_folder(tmp_path):
    from PIL import Image  # test-only: write the images

    data = tmp_path / "data"
    data.mkdir()
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    Image.fromarray(rgb).convert("P").save(data / "palette.png")
    grey = np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 0, np.uint8)], -1)
    grey[0, 0, 1] = 255
    Image.fromarray(grey, "LA").save(data / "grey_alpha.png")
    Image.fromarray(rgb).save(tmp_path / "outside.png")
    lines = [{"image": "palette.png", "caption": "p"}, {"image": "grey_alpha.png", "caption": "g"},
             {"image": "../outside.png", "caption": "up"},
             {"image": str(tmp_path / "outside.png"), "caption": "absolute"}]
    (data / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    src = JsonlSource(str(data / "pairs.jsonl"))
    np.testing.assert_array_equal(src[0].image, rgb)
    want = np.full((4, 4, 3), 255, np.uint8)  # transparent grey: white
    want[0, 0] = 100  # the one opaque pixel
    np.testing.assert_array_equal(src[1].image, want)
    for i in (2, 3):
        with pytest.raises(BadRecord, match="is outside .*relative to the JSONL file's folder"):
            src[i]


# --- webdataset and parquet ----------------------------------------------------------------

def encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_tar(path, samples, cut=None):
    """A tar as webdataset's TarWriter writes one (PAX, float mtimes, a sample's members in
    sorted extension order); `cut`: keep only the bytes before it (a truncated copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(members[ext]), 1700000000.25
                tar.addfile(info, io.BytesIO(members[ext]))
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    return path


def data_offset(path, name, inside=0):
    """Where member `name`'s data starts (+ inside) in the tar at `path`."""
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data + inside


def make_webdataset(tmp_path):
    """Two img2dataset-like shards, the second truncated inside its last caption; returns
    (pattern, {id: (pixels, caption)} of the good samples in order, {id: reason} of the bad
    ones, the .json meta of the first sample)."""
    rng = np.random.default_rng(0)
    img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a, b, c, d, e = img(12, 16), img(16, 16), img(10, 10), img(9, 7), img(8, 8)
    png_a, jpg_b = encode(a, "PNG"), encode(b, "JPEG", quality=90)
    meta = {"url": "http://x/a.png", "key": "000000000", "status": "success"}
    shard0 = [("000000000", {"png": png_a, "txt": b"a red square", "cls": b"3",
                             "json": json.dumps(meta, indent=4).encode()}),
              ("000000001", {"jpg": jpg_b, "txt": "ünïcode jpeg".encode()}),
              ("000000002", {"webp": encode(c, "WEBP", lossless=True), "txt": b"webp"}),
              ("000000003", {"png": png_a[: len(png_a) // 2], "txt": b"corrupt"}),
              ("000000004", {"txt": b"no image"}),
              ("000000005", {"png": encode(d, "PNG")})]
    write_tar(tmp_path / "shards" / "00000.tar", shard0)
    shard1 = [("000010000", {"png": encode(e, "PNG"), "txt": b"last good"}),
              ("000010001", {"png": encode(d, "PNG"), "txt": b"cut in its caption"})]
    whole = write_tar(tmp_path / "whole.tar", shard1)
    write_tar(tmp_path / "shards" / "00001.tar", shard1,
              cut=data_offset(whole, "000010001.txt", inside=5))
    good = {"00000/000000000": (a, "a red square"), "00000/000000001": (decode(jpg_b), "ünïcode jpeg"),
            "00000/000000002": (c, "webp"), "00001/000010000": (e, "last good")}
    bad = {"00000/000000003": "corrupt_image", "00000/000000004": "missing_file",
           "00000/000000005": "empty_caption", "00001/000010001": "empty_caption",
           "00001.tar": "truncated_tar"}
    return str(tmp_path / "shards" / "{00000..00001}.tar"), good, bad, meta


def records(src):
    """[(id, Pair or (reason, detail))] of every record, in order."""
    out = []
    for i in range(len(src)):
        try:
            pair = src[i]
            out.append((pair.id, pair))
        except BadRecord as e:
            out.append((e.record_id, (e.reason, e.detail)))
    return out


def test_source_files_braces(tmp_path):
    """source.path braces as braceexpand expands them (bash's rules), on real files."""
    t = str(tmp_path)
    for name in ([f"{i:05d}.tar" for i in range(8, 12)] + ["8", "9", "10", "008", "009", "010",
                 "011", "abf", "acdf", "acef", "{x}.tar", "{x,y}.tar"]
                 + [f"{n}-{c}" for n in (1, 2, 3) for c in "ab"]):
        (tmp_path / name).write_bytes(b"")
    names = lambda pattern: [p.removeprefix(t + "/") for p in source_files(f"{t}/{pattern}")]
    assert names("{00008..00011}.tar") == [f"{i:05d}.tar" for i in range(8, 12)]  # padding kept
    assert names("{8..10}") == ["8", "9", "10"]  # no leading zero: no padding
    assert names("{8..011}") == ["008", "009", "010", "011"]  # a padded end pads all
    assert names("{10..8..2}") == ["10", "8"]  # counting down, with a step
    assert names("{3..1}-{a,b}") == ["3-a", "3-b", "2-a", "2-b", "1-a", "1-b"]
    assert names("{3..1}-{a..b}") == names("{3..1}-{a,b}")  # letter ranges too
    assert names("a{b,c{d,e}}f") == ["abf", "acdf", "acef"]  # nested, in the order written
    assert names("{x}.tar") == ["{x}.tar"]  # neither a list nor a range: a literal name
    assert names(r"\{x,y\}.tar") == ["{x,y}.tar"]  # an escaped brace is literal
    for pattern in ("a{b", "a}b", "{a,b", "a{b}}"):
        with pytest.raises(SourceError, match=re.escape(f"source.path='{t}/{pattern}': "
                                                        "unbalanced braces")):
            names(pattern)
    with pytest.raises(SourceError, match=re.escape(f"{t}/}}{{ does not exist")):
        names("}{")  # braceexpand reads a '}' before any '{' as a literal
    with pytest.raises(SourceError, match=r"\{0\.\.99999999\} names more than 1,000,000 files"):
        names("{0..99999999}.tar")  # before braceexpand holds 10^8 names in memory


def test_source_files_order(tmp_path):
    for name in ("b.tar", "a.tar", "c.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.tar").mkdir()  # a directory is not a shard
    t = str(tmp_path)
    assert source_files(f"{t}/*.tar") == [f"{t}/{n}.tar" for n in "abc"]  # glob: sorted
    assert source_files(f"{t}/{{c,a}}.tar") == [f"{t}/c.tar", f"{t}/a.tar"]  # as written
    assert source_files(f"{t}/{{c,[ab]}}.tar") == [f"{t}/c.tar", f"{t}/a.tar", f"{t}/b.tar"]
    assert source_files(f"{t}/{{b,*}}.tar") == [f"{t}/b.tar", f"{t}/a.tar", f"{t}/c.tar"]
    with pytest.raises(SourceError, match=r"source.path=.*/e.tar does not exist"):
        source_files(f"{t}/{{a,e}}.tar")
    with pytest.raises(SourceError, match=r"/\*.parquet matches no file"):
        source_files(f"{t}/*.parquet")


def test_webdataset_records(tmp_path):
    pattern, good, bad, meta = make_webdataset(tmp_path)
    src = WebDatasetSource(pattern)
    got = records(src)
    assert len(src) == 9 and [r for r, _ in got] == [
        "00000/000000000", "00000/000000001", "00000/000000002", "00000/000000003",
        "00000/000000004", "00000/000000005", "00001/000010000", "00001/000010001", "00001.tar"]
    pairs = {r: p for r, p in got if isinstance(p, Pair)}
    assert list(pairs) == list(good)
    for record_id, (image, caption) in good.items():
        assert pairs[record_id].caption == caption
        np.testing.assert_array_equal(pairs[record_id].image, image)
    shard0, shard1 = str(tmp_path / "shards" / "00000.tar"), str(tmp_path / "shards" / "00001.tar")
    assert pairs["00000/000000000"].meta == {"source": "webdataset", "shard": shard0,
                                             "key": "000000000", "json": meta}
    assert "json" not in pairs["00000/000000001"].meta
    skipped = {r: p for r, p in got if not isinstance(p, Pair)}
    assert {r: reason for r, (reason, _) in skipped.items()} == bad
    for record_id, (_, detail) in skipped.items():  # the shard and the key named
        shard = shard1 if record_id.startswith("00001") else shard0
        assert detail.startswith(shard + ":") and record_id.split("/")[-1] in detail + ".tar"
    assert "000000004.txt" in skipped["00000/000000004"][1]  # what the sample does hold
    assert "no .txt member" in skipped["00000/000000005"][1]
    assert ("cut inside member 000010001.txt" in skipped["00001.tar"][1]
            and "2 sample(s) before it" in skipped["00001.tar"][1])
    assert src.caption(1) == "ünïcode jpeg"
    with pytest.raises(BadRecord, match="empty_caption"):
        src.caption(5)
    with pytest.raises(IndexError):
        src[9]

    # the same records from a glob, a fresh instance and a size limit; a pickled source
    # brings its layout along (a reader process lists nothing)
    same = WebDatasetSource(str(tmp_path / "shards" / "*.tar"))
    assert [r for r, _ in records(same)] == [r for r, _ in got]
    assert len(WebDatasetSource(pattern, size=4)) == 4
    blob = pickle.dumps(src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "source_files", lambda p: pytest.fail("listed the shards again"))
        mp.setattr(sources, "_list_tar", lambda *a: pytest.fail("listed a shard again"))
        clone = pickle.loads(blob)
        assert len(clone) == 9 and clone[6].caption == "last good"


def test_webdataset_damage(tmp_path):
    rng = np.random.default_rng(1)
    samples = [(f"k{i}", {"png": encode(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "PNG"),
                          "txt": f"caption {i}".encode()}) for i in range(2)]
    whole = write_tar(tmp_path / "whole.tar", samples)
    with tarfile.open(whole) as tar:
        last = tar.getmember("k1.txt")
        end = last.offset_data + -(-last.size // 512) * 512
        header_k1 = tar.getmember("k1.png").offset  # its PAX header
        ustar_k1 = tar.getmember("k1.png").offset_data - 512  # the header after it
    data = whole.read_bytes()
    garble = lambda at: data[:at] + b"x" * 64 + data[at + 64:]
    # (case, the damaged copy, where it breaks, what the samples before the break read as)
    for name, broken, damage, read in [
            ("boundary", data[:end], f"no end-of-archive marker: the file ends at byte {end}",
             ["pair", "pair"]),
            ("one zero block", data[:end + 512], "no end-of-archive marker: one zero block at "
             f"byte {end}, then the file ends", ["pair", "pair"]),
            ("header", data[:header_k1 + 100], f"cut inside the header at byte {header_k1}",
             ["pair"]),
            ("pax record only", data[:header_k1 + 512], "cut inside the header at byte "
             f"{header_k1}", ["pair"]),
            ("garbled", garble(header_k1), f"bad header at byte {header_k1} (bad checksum)",
             ["pair"]),
            ("after pax", garble(ustar_k1), f"bad header at byte {header_k1} (bad checksum)",
             ["pair"]),
            ("past the end", data[:last.offset_data + 3], "cut inside member k1.txt (its "
             f"data ends at byte {last.offset_data + last.size}, the file at "
             f"{last.offset_data + 3})", ["pair", "empty_caption"])]:  # k1 keeps its png
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.tar").write_bytes(broken)
        got = records(WebDatasetSource(str(tmp_path / name / "0.tar")))
        assert [r for r, _ in got] == [f"0/k{i}" for i in range(len(read))] + ["0.tar"]
        assert ["pair" if isinstance(p, Pair) else p[0] for _, p in got[:-1]] == read
        assert got[-1][1] == ("truncated_tar", f"{tmp_path / name / '0.tar'}: {damage}; "
                              f"{len(read)} sample(s) before it are read, the rest is lost")

    for name, data, message in [
            ("tiny", whole.read_bytes()[:300], "nothing readable: cut inside the header at "
             "byte 0"),
            ("junk", b"not a tar file at all" * 40, r"nothing readable: bad header at byte 0 "
             r"\(invalid header\)"),
            ("nothing", b"", "nothing readable: no end-of-archive marker: the file ends at byte 0"),
            ("gz", gzip.compress(whole.read_bytes()), "gzip-compressed"),
            ("empty", b"\0" * 1024, "hold no sample")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.tar").write_bytes(data)
        with pytest.raises(SourceError, match=message) as e:
            len(WebDatasetSource(str(tmp_path / name / "*.tar")))
        assert name in str(e.value)
    # shards past the first `size` records are never opened
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "0.tar").write_bytes(whole.read_bytes())
    (tmp_path / "ok" / "1.tar").write_bytes(b"junk")
    assert len(WebDatasetSource(str(tmp_path / "ok" / "*.tar"), size=2)) == 2


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_webdataset_tar_formats(tmp_path, fmt):
    """Long names (a USTAR prefix, a GNU long-name record, a PAX path), a directory and a
    name without extension between samples: a reader starting at a sample's first header
    (the long-name record) gets its members."""
    long_key = "d" * 70 + "/" + "k" * 80
    keys = ["a", long_key] + (["ünï"] if fmt == tarfile.PAX_FORMAT else [])
    png = encode(np.full((4, 4, 3), 9, np.uint8), "PNG")
    with tarfile.open(tmp_path / "0.tar", "w", format=fmt) as tar:
        for i, key in enumerate(keys):
            for name, data in ((f"{key}.png", png), ("README", b"hi"), (f"{key}.txt", f"c{i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"dir{i}")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    src = WebDatasetSource(str(tmp_path / "0.tar"))
    assert [(p.id, p.caption) for p in (src[i] for i in range(len(src)))] == [
        (f"0/{k}", f"c{i}") for i, k in enumerate(keys)]


def test_webdataset_ids_across_folders_and_joined_archives(tmp_path):
    """Shards of the same name in two folders keep distinct ids (the path below the shared
    folder); archives joined end to end are reported, not silently cut to the first."""
    png = encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    for folder in ("train", "extra"):
        write_tar(tmp_path / folder / "00000.tar", [("k", {"png": png, "txt": b"x"})])
    src = WebDatasetSource(str(tmp_path / "{train,extra}/*.tar"), None)
    assert [i for i, _ in records(src)] == ["train/00000/k", "extra/00000/k"]
    one = write_tar(tmp_path / "one.tar", [("a", {"png": png, "txt": b"first"})])
    two = write_tar(tmp_path / "two.tar", [("b", {"png": png, "txt": b"second"})])
    (tmp_path / "joined.tar").write_bytes(one.read_bytes() + two.read_bytes())
    got = records(WebDatasetSource(str(tmp_path / "joined.tar"), None))
    assert [i for i, _ in got] == ["joined/a", "joined.tar"]
    assert got[1][1][0] == "truncated_tar"
    assert "data after the end-of-archive marker" in got[1][1][1]


def write_parquet(path, columns, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_records(tmp_path):
    rng = np.random.default_rng(2)
    a, b, c = (rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(3))
    jpg_b = encode(b, "JPEG")
    images = [encode(a, "PNG"), jpg_b, None, b"not an image", encode(a, "PNG"),
              encode(a, "PNG"), encode(c, "PNG")]
    captions = ["first", "second", "failed download", "junk", None, "  ", "seventh"]
    write_parquet(tmp_path / "p" / "00000.parquet", {
        "key": [f"{i:09d}" for i in range(7)], "caption": captions, "jpg": images}, 3)
    write_parquet(tmp_path / "p" / "00001.parquet", {
        "caption": ["other file"], "jpg": [encode(c, "PNG")]}, 3)
    src = ParquetSource(str(tmp_path / "p" / "{00000..00001}.parquet"))
    got = records(src)
    assert [r for r, _ in got] == [f"00000/{i}" for i in range(7)] + ["00001/0"]
    pairs = {r: p for r, p in got if isinstance(p, Pair)}
    want = {"00000/0": (a, "first"), "00000/1": (decode(jpg_b), "second"),
            "00000/6": (c, "seventh"), "00001/0": (c, "other file")}
    assert list(pairs) == list(want)
    for record_id, (image, caption) in want.items():
        np.testing.assert_array_equal(pairs[record_id].image, image)
        assert pairs[record_id].caption == caption
    assert pairs["00000/6"].meta == {"source": "parquet", "row": 6,
                                     "file": str(tmp_path / "p" / "00000.parquet")}
    skipped = {r: p for r, p in got if not isinstance(p, Pair)}
    assert {r: reason for r, (reason, _) in skipped.items()} == {
        "00000/2": "missing_file", "00000/3": "corrupt_image", "00000/4": "empty_caption",
        "00000/5": "empty_caption"}
    assert skipped["00000/2"][1] == f"{tmp_path}/p/00000.parquet row 2: 'jpg' is null"
    assert skipped["00000/3"][1].startswith(f"{tmp_path}/p/00000.parquet row 3: ")
    assert [src.caption(i) for i in (0, 6, 7)] == ["first", "seventh", "other file"]
    assert len(ParquetSource(str(tmp_path / "p" / "*.parquet"), size=5)) == 5
    assert [r for r, _ in records(ParquetSource(str(tmp_path / "p" / "{00001,00000}.parquet")))][:2] \
        == ["00001/0", "00000/0"]  # files in the order the pattern names them

    # Hugging Face datasets' Image feature: a struct of bytes and path
    write_parquet(tmp_path / "hf" / "train-00000.parquet", {
        "image": [{"bytes": encode(a, "PNG"), "path": "a.png"}, {"bytes": None, "path": "b.png"}],
        "text": ["hf row", "path only"]}, 10)
    hf = ParquetSource(str(tmp_path / "hf" / "*.parquet"), image_key="image", text_key="text")
    np.testing.assert_array_equal(hf[0].image, a)
    with pytest.raises(BadRecord, match="missing_file") as e:
        hf[1]
    assert "path 'b.png'" in e.value.detail
    with pytest.raises(SourceError, match=r"no column 'jpg' \(source.image_key\); its "
                                          r"columns: image, text"):
        len(ParquetSource(str(tmp_path / "hf" / "*.parquet")))
    with pytest.raises(SourceError, match=r"'caption' \(source.text_key\) is int64"):
        write_parquet(tmp_path / "ints" / "0.parquet", {"jpg": [b"x"], "caption": [3]}, 1)
        len(ParquetSource(str(tmp_path / "ints" / "0.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(SourceError, match="junk.parquet: not a readable Parquet file"):
        len(ParquetSource(str(tmp_path / "junk.parquet")))


@pytest.mark.parametrize("overrides, message", [
    (["source.kind=webdataset"], "source.path: the webdataset source needs its files"),
    (["source.kind=parquet"], "source.path: the parquet source needs its files"),
    (["source.kind=parquet", "source.path=x.parquet", "source.image_key=' '"],
     "source.image_key: the parquet source needs a column name"),
    (["source.kind=parquet", "source.path=x.parquet", "source.text_key=' '"],
     "source.text_key: the parquet source needs a column name"),
    (["source.kind=parquet", "source.path=x.parquet", "source.text_key=jpg"],
     re.escape("source.image_key (null: jpg for parquet) and source.text_key are both 'jpg': "
               "name two columns")),
    (["source.kind=parquet", "source.path=x.parquet", "source.image_key=txt",
      "source.text_key=txt"],
     "source.image_key and source.text_key are both 'txt': name two columns"),
])
def test_source_config_checks(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_open_source_kinds(tiny, tmp_path):
    pattern, *_ = make_webdataset(tmp_path)
    src = open_source(tiny("source.kind=webdataset", f"source.path={pattern}").source)
    assert src == WebDatasetSource(pattern, size=10000)
    src = open_source(tiny("source.kind=parquet", "source.path=p/*.parquet", "source.size=null",
                           "source.image_key=image", "source.text_key=text").source)
    assert src == ParquetSource("p/*.parquet", "image", "text", None)
    # source.image_key null: `jpg` (img2dataset's column) for parquet, `image` for the others
    cfg = tiny("source.kind=parquet", "source.path=p/*.parquet").source
    assert cfg.image_key is None and open_source(cfg) == ParquetSource("p/*.parquet", "jpg",
                                                                       "caption", 10000)
    assert open_source(tiny("source.kind=jsonl", "source.path=a.jsonl").source) == \
        JsonlSource("a.jsonl", "image", "caption", 10000)
    assert open_source(tiny("source.kind=jsonl", "source.path=a.jsonl", "source.image_key=jpg",
                            "source.text_key=txt").source) == JsonlSource("a.jsonl", "jpg", "txt",
                                                                          10000)
    assert open_source(tiny("source.kind=tfds", "source.name=coco").source) == \
        TfdsSource("coco", "train", None, "image", "caption", 10000)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_prepare_webdataset(tiny, tmp_path, workers):
    """`cm3leon prepare` end to end on the shards of make_webdataset (a random image
    tokenizer: this checks the data path), in this process and in two reader processes
    (which get the shard layout with the pickled source)."""
    from conftest import CONFIGS
    from test_prepare import VQ, config  # test_prepare imports this module: not at the top

    from cm3leon_jax.config import load_config
    from cm3leon_jax.data.prepare import prepare
    from cm3leon_jax.data.records import iter_documents
    from cm3leon_jax.data.sources import fit_image
    from cm3leon_jax.tokenizers.image import ImageTokenizer

    pattern, good, bad, meta = make_webdataset(tmp_path)
    vq = tmp_path / "vq"
    ImageTokenizer.create(load_config(CONFIGS / "tiny.yaml", VQ).vqgan, seed=0).save(vq)
    m = prepare(config(tiny, tmp_path, "out", "source.kind=webdataset", f"source.path={pattern}",
                       "source.size=null", f"prepare.image_tokenizer={vq}",
                       "prepare.max_bad_fraction=0.6", "prepare.shard_size=4",
                       "prepare.batch_size=2", f"prepare.workers={workers}"), progress=False)
    assert (m["records"], m["documents"], len(m["shards"])) == (9, 4, 3)
    assert m["skipped"] == {"corrupt_image": 1, "empty_caption": 2, "missing_file": 1,
                            "truncated_tar": 1}
    logged = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in logged} == bad
    docs = list(iter_documents(tmp_path / "out"))
    assert [(d["id"], d["caption"]) for d in docs] == [(k, c) for k, (_, c) in good.items()]
    for d, (image, _) in zip(docs, good.values()):
        np.testing.assert_array_equal(d["pixels"], fit_image(image, 24))
    assert json.loads(docs[0]["meta"])["json"] == meta
