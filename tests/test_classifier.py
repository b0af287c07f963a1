"""The Fashion-MNIST judge of the retrieval ablation (eval/classifier.py) and the held-out
items it reads (demo/job.py)."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import CONFIGS

from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.data.sources import FASHION_MNIST_DIR, _fashion_mnist, fit_image
from cm3leon_jax.demo import job
from cm3leon_jax.eval import classifier

FASHION = ["source.kind=fashion_mnist", "source.max_objects=1", "demo.heldout_docs=5",
           "demo.eval_scenes=7", "demo.image_tokenizer=train"]


def fashion(split: str, first: int, n: int):
    images, labels = _fashion_mnist(FASHION_MNIST_DIR, split)
    x = np.stack([fit_image(np.repeat(im[:, :, None], 3, 2), 32) for im in images[first:first + n]])
    return x, labels[first:first + n].astype(np.int32)


@pytest.mark.slow
def test_classifier_learns_fashion_mnist_deterministically_and_round_trips(tmp_path):
    x, y = fashion("train", 0, 2000)
    xt, yt = fashion("test", 0, 1000)
    a = classifier.train_classifier(x, y, 10, steps=150)
    b = classifier.train_classifier(x, y, 10, steps=150)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))  # same seed, same weights
    predicted = a.predict(xt)
    assert a.accuracy(xt, yt) == np.mean(predicted == yt) > 0.7  # chance is 0.1
    classifier.save(a, tmp_path / "clf", {"steps": 150})
    assert classifier.saved(tmp_path / "clf")
    loaded, info = classifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(loaded.predict(xt), predicted)
    assert info == {"classes": 10, "resolution": 32, "steps": 150}
    with pytest.raises(ValueError, match=r"uint8 \[B, 32, 32, 3\]"):
        a.predict(xt[:, :28, :28])
    with pytest.raises(ValueError, match="labels 0..10 outside 0..9"):
        classifier.train_classifier(x[:3], np.array([0, 10, 1]), 10, steps=1)


def test_fashion_held_out_items_are_test_images_after_the_held_out_documents(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", FASHION)
    items = job.held_out(cfg, 32)
    x, y = fashion("test", 5, 7)  # the first 5 test images are the held-out documents
    assert [p.id for p in items] == [f"fashion_mnist-test-{i}" for i in range(5, 12)]
    np.testing.assert_array_equal(np.stack([p.image for p in items]), x)
    assert [p.meta["label"] for p in items] == y.tolist()
    docs = job.heldout_config(dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, dir=str(tmp_path / "data")))).source
    assert (docs.kind, docs.split, docs.size) == ("fashion_mnist", "test", 5)
    shapes = load_config(CONFIGS / "demo.yaml", ["source.size=30", "demo.eval_scenes=4"])
    assert [p.id for p in job.held_out(shapes, 32)] == [f"shapes-0-{i}" for i in range(30, 34)]
    too_many = load_config(CONFIGS / "demo.yaml", [*FASHION, "demo.eval_scenes=10000"])
    with pytest.raises(ConfigError, match="demo.heldout_docs \\+ demo.eval_scenes = 10005"):
        job.held_out(too_many, 32)


def test_the_packaged_image_tokenizer_is_refused_for_other_data(tmp_path):
    with pytest.raises(ConfigError, match="source.kind is 'fashion_mnist': set "
                                          "demo.image_tokenizer=train"):
        job.demo_config(CONFIGS / "demo.yaml", tmp_path, [*FASHION[:2], "train.batch_size=8",
                                                          "demo.image_tokenizer=packaged"])
