import json

import numpy as np
import pytest
from scipy import ndimage

from cm3leon_jax.data.sources import (BACKGROUND, COLOURS, NUMBERS, SHAPES, BadRecord, Pair,
                                      ShapesSource)


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
