"""LPIPS (Zhang et al. 2018), the `lpips` package's "vgg" network, version 0.1, in JAX.

The distance `lpips.LPIPS(net='vgg', version='0.1')` computes (lpips 0.1.4), per image pair:

1. lpips' `ScalingLayer`: (x - shift) / scale per channel, shift (-.030, -.088, -.188),
   scale (.458, .448, .450), on images in [-1, 1];
2. VGG16's convolutional trunk as torchvision's `vgg16().features` lays it out: blocks of
   2, 2, 3, 3, 3 conv3x3 (padding 1) + ReLU with a 2x2 max pool between blocks (floor
   sizes), tapped after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3;
3. at each tap, features unit-normalised over channels (`normalize_tensor`:
   f / (||f|| + 1e-10)), the squared difference of the two images' features weighted per
   channel by the learned 1x1 head `lin{k}` (non-negative, no bias), averaged over space;
4. the five layers summed: one distance per pair, 0 for identical images.

Images are NHWC, uint8 0..255 (mapped to x / 127.5 - 1) or float already in [-1, 1] (lpips'
own convention, `normalize=False`, and the VQ-GAN's pixel range); at least 16x16, so that
relu5_3 has a position. The distance is differentiable in both images (the loss use): the
channel norm has a finite gradient where a tap is all zero, which a plain sqrt lacks.

Weights are the published files, given by the user (nothing downloads): torchvision's VGG16
state dict `vgg16-397923af.pth` (`features.{i}.weight` / `.bias`; its `classifier.*` is
not used) and lpips' heads `lpips/weights/v0.1/vgg.pth` exactly as the `lpips` wheel ships
them (`lin{k}.model.1.weight`, [1, C, 1, 1]). A `.pth` needs torch to unpickle; the same
names in an `.npz` / `.safetensors` do not (`save_npz`, weights.py). Without the trunk the
VGG is random and the number has no perceptual meaning (tests, plumbing, speed); without
the heads every channel weighs 1, lpips' `lpips=False` baseline. `LPIPS.pretrained` says
whether both came from files. Parity with a torch reference on random weights is tested
(tests/test_lpips.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cm3leon_jax import storage
from cm3leon_jax.perception import weights

SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor
BLOCKS = ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512),
          (512, 512, 512, 512))  # channels in, then out of each conv, per VGG16 block
MIN_SIZE = 16  # four 2x2 max pools before relu5_3


def _conv_indices() -> tuple[tuple[int, ...], ...]:
    """`features.{i}` index of every conv, per block: conv and ReLU take one index each,
    the max pool after a block one more (0, 2 | 5, 7 | 10, 12, 14 | 17, ... | 24, 26, 28)."""
    i, out = 0, []
    for block in BLOCKS:
        out.append(tuple(range(i, i + 2 * (len(block) - 1), 2)))
        i += 2 * (len(block) - 1) + 1
    return tuple(out)


CONVS = _conv_indices()


def _vgg_shapes() -> dict[str, tuple]:
    """Every trunk weight LPIPS uses -> its shape (torchvision's names and layouts)."""
    out = {}
    for block, indices in zip(BLOCKS, CONVS):
        for cin, cout, i in zip(block, block[1:], indices):
            out[f"features.{i}.weight"] = (cout, cin, 3, 3)
            out[f"features.{i}.bias"] = (cout,)
    return out


VGG_EXPECTED = _vgg_shapes()
HEADS_EXPECTED = {f"lin{k}.model.1.weight": (1, block[-1], 1, 1)
                  for k, block in enumerate(BLOCKS)}
VGG_FILES = "torchvision's vgg16-397923af.pth, or an .npz of its features.* from save_npz"
HEADS_FILES = "lpips' weights/v0.1/vgg.pth from the lpips wheel, or an .npz from save_npz"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class LPIPS:
    """VGG16 trunk and heads (torch names and layouts -> float32 arrays) and their origin.

    A pytree, not an nnx.Module: nothing in it trains, and a jitted training step that
    takes it as an argument keeps its 15M weights out of the compiled constants."""

    params: dict
    source: str = dataclasses.field(metadata={"static": True})
    pretrained: bool = dataclasses.field(metadata={"static": True})

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """The distance [N] between images x[i] and y[i], both [N, H, W, 3] of one shape."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected two images [N, H, W, 3] of one shape, got {x.shape} "
                             f"and {y.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"images of {x.shape[1]}x{x.shape[2]}: LPIPS needs at least "
                             f"{MIN_SIZE}x{MIN_SIZE} (relu5_3 is 1/16 of the size)")
        return distance(self.params, x, y)


# ---------------------------------------------------------------------------- forward


def _scaled(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 127.5 - 1.0
    return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def _taps(W: dict, x: jax.Array) -> list[jax.Array]:
    """The five ReLU outputs LPIPS compares, NHWC (kernels stay OIHW as stored)."""
    out = []
    for b, indices in enumerate(CONVS):
        if b:
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        for i in indices:
            x = lax.conv_general_dilated(x, W[f"features.{i}.weight"], (1, 1),
                                         ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                         precision=lax.Precision.HIGHEST)
            x = jax.nn.relu(x + W[f"features.{i}.bias"])
        out.append(x)
    return out


def _unit(f: jax.Array) -> jax.Array:
    """f / (||f|| + eps) over channels; the norm through a where, so an all-zero position
    (frequent after a ReLU) gets a zero gradient instead of sqrt's 0 * inf = nan."""
    sq = jnp.sum(f * f, axis=-1, keepdims=True)
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


@jax.jit
def distance(W: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS [N] of images x, y [N, H, W, 3] (uint8, or float in [-1, 1]) under weights W
    (`LPIPS.params`); both images go through VGG as one batch."""
    n = x.shape[0]
    feats = _taps(W, _scaled(jnp.concatenate([x, y])))
    total = jnp.zeros((n,), jnp.float32)
    for k, f in enumerate(feats):
        f = _unit(f)
        head = W[f"lin{k}.model.1.weight"].reshape(-1)
        total = total + jnp.mean(jnp.sum((f[:n] - f[n:]) ** 2 * head, axis=-1), axis=(1, 2))
    return total


# ---------------------------------------------------------------------------- weights


def _vgg(state: dict, source: str) -> dict:
    """VGG16 `features.*` arrays; the classifier of a full torchvision state dict dropped."""
    arrays = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    return weights.checked(arrays, VGG_EXPECTED, source,
                           "torchvision's VGG16 weights (features.*)")


def _heads(state: dict, source: str) -> dict:
    """The five lpips heads, refused if any weight is negative (lpips trains them clamped
    at 0; a negative one would let the distance go below 0)."""
    params = weights.checked(state, HEADS_EXPECTED, source, "lpips' v0.1 vgg heads (lin0..lin4)")
    for key, value in params.items():
        if bool((value < 0).any()):
            raise ValueError(f"{source}: {key} has negative weights (lpips' heads are "
                             f"non-negative)")
    return params


def _random_vgg(rng: np.random.Generator) -> dict:
    """He-scaled kernels and zero biases, the shapes of VGG16's trunk."""
    return {key: rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            if key.endswith("weight") else np.zeros(shape)
            for key, shape in VGG_EXPECTED.items()}


def random_init(seed: int) -> LPIPS:
    """Random trunk and random non-negative heads of the real shapes: for tests and speed
    measurements only; the number means nothing perceptually."""
    rng = np.random.default_rng(seed)
    heads = {key: rng.uniform(0, 0.5, size=shape)  # about the published heads' size
             for key, shape in HEADS_EXPECTED.items()}
    params = {**_vgg(_random_vgg(rng), f"random-{seed}"), **_heads(heads, f"random-{seed}")}
    return LPIPS(params=params, source=f"vgg random-{seed}, heads random-{seed}",
                 pretrained=False)


def load_lpips(vgg_weights: storage.PathLike | None,
               heads: storage.PathLike | None) -> LPIPS:
    """LPIPS from torchvision's VGG16 state dict and lpips' v0.1 vgg heads (.pth, .pt, .npz
    or .safetensors with their torch names; local or on cloud storage).

    `vgg_weights=None` gives a random VGG (He-scaled, seed 0): such a distance has NO
    perceptual meaning, whatever the heads; use it for tests and plumbing only.
    `heads=None` weighs every channel 1 (lpips' `lpips=False` baseline), a VGG feature
    distance that is not the calibrated LPIPS. `pretrained` is True only with both files."""
    if vgg_weights is None:
        vgg_source = "vgg random-0 (no perceptual meaning)"
        vgg = _vgg(_random_vgg(np.random.default_rng(0)), vgg_source)
    else:
        vgg_source = str(storage.path(vgg_weights))
        vgg = _vgg(weights.read_state_dict(vgg_weights, "the VGG16 weights", VGG_FILES),
                   vgg_source)
    if heads is None:
        heads_source = "heads ones (lpips=False baseline)"
        lin = _heads({key: np.ones(shape) for key, shape in HEADS_EXPECTED.items()},
                     heads_source)
    else:
        heads_source = str(storage.path(heads))
        lin = _heads(weights.read_state_dict(heads, "the LPIPS heads", HEADS_FILES),
                     heads_source)
    return LPIPS(params={**vgg, **lin}, source=f"{vgg_source}, {heads_source}",
                 pretrained=vgg_weights is not None and heads is not None)


def save_npz(model: LPIPS, vgg_path: storage.PathLike, heads_path: storage.PathLike) -> None:
    """The trunk and the heads as two .npz files with torch's names, loadable without
    torch by `load_lpips`."""
    weights.save_npz({k: v for k, v in model.params.items() if k in VGG_EXPECTED}, vgg_path)
    weights.save_npz({k: v for k, v in model.params.items() if k in HEADS_EXPECTED},
                     heads_path)
