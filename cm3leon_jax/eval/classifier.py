"""A small CNN that reads the class off an image: the text->image score of class-captioned
data (Fashion-MNIST), as the shapes detector is of shapes scenes.

A generated image counts as right when the classifier names the class its caption asks for.
Nothing pretrained fits: no Fashion-MNIST classifier ships with our packages, nothing here
downloads, and CLIP's zero-shot reading of 32-pixel gray clothes is not a class-level score.
So it is trained where it is used, on the training split at the image tokenizer's resolution,
for a fixed number of steps from a fixed seed (the same weights every time on CPU), and
scored on held-out images, which bounds any accuracy it gives. Two convolutions and two
dense layers: ~90 % on Fashion-MNIST's test split after a minute on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.tokenizers.image import flatten, unflatten

WEIGHTS, INFO = "classifier.npz", "classifier.json"


class Net(nnx.Module):
    def __init__(self, classes: int, resolution: int, rngs: nnx.Rngs):
        if resolution % 4:
            raise ValueError(f"classifier: resolution {resolution} is not a multiple of 4")
        self.conv1 = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(64 * (resolution // 4) ** 2, 128, rngs=rngs)
        self.out = nnx.Linear(128, classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / 127.5 - 1.0
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


@dataclasses.dataclass(frozen=True)
class Classifier:
    """uint8 [B, R, R, 3] images -> class ids."""
    graphdef: nnx.GraphDef
    params: dict
    classes: int
    resolution: int
    batch: int = 256

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        r = self.resolution
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"classifier: expected uint8 [B, {r}, {r}, 3] images, got "
                             f"{images.dtype} {images.shape}")
        return np.concatenate([np.asarray(_logits(self.graphdef, self.params,
                                                  images[i:i + self.batch])).argmax(-1)
                               for i in range(0, len(images), self.batch)] or
                              [np.zeros(0, np.int64)])

    def accuracy(self, images: np.ndarray, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


@jax.jit
def _logits(graphdef, params, images):
    return nnx.merge(graphdef, params)(images)


def _abstract(classes: int, resolution: int, seed: int):
    return nnx.split(Net(classes, resolution, nnx.Rngs(seed)))


def train_classifier(images: np.ndarray, labels: np.ndarray, classes: int, steps: int = 1000,
                     batch: int = 64, lr: float = 1e-3, seed: int = 0) -> Classifier:
    """Adam on cross-entropy over batches drawn in per-epoch permutations fixed by `seed`."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"classifier: {len(images)} images and {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"classifier: labels {labels.min()}..{labels.max()} outside "
                         f"0..{classes - 1}")
    resolution = images.shape[1]
    graphdef, params = _abstract(classes, resolution, seed)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    per_epoch = max(len(images) // batch, 1)
    order = None
    for s in tqdm(range(steps), desc="classifier", unit="step", leave=False):
        if s % per_epoch == 0:
            order = np.random.default_rng([seed, s // per_epoch]).permutation(len(images))
        rows = order[(s % per_epoch) * batch:(s % per_epoch + 1) * batch]
        params, opt_state, _ = step(params, opt_state, images[rows], labels[rows])
    return Classifier(graphdef, params, classes, resolution)


def save(clf: Classifier, directory: storage.PathLike, info: dict) -> None:
    d = storage.path(directory)
    d.mkdir(parents=True, exist_ok=True)
    storage.save_npz(d / WEIGHTS, **flatten(nnx.to_pure_dict(clf.params)))
    (d / INFO).write_text(json.dumps({"classes": clf.classes, "resolution": clf.resolution,
                                      **info}, indent=1) + "\n")


def load(directory: storage.PathLike) -> tuple[Classifier, dict]:
    d = storage.path(directory)
    info = json.loads((d / INFO).read_text())
    graphdef, params = _abstract(info["classes"], info["resolution"], 0)
    pure = unflatten(storage.load_npz(d / WEIGHTS), nnx.to_pure_dict(params), str(d / WEIGHTS))
    nnx.replace_by_pure_dict(params, pure)
    return Classifier(graphdef, params, info["classes"], info["resolution"]), info


def saved(directory: storage.PathLike) -> bool:
    d = storage.path(directory)
    return (d / INFO).exists() and (d / WEIGHTS).exists()
