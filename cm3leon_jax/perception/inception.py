"""The FID InceptionV3 in JAX, from the standard `inception-2015-12-05` weight file.

FID numbers are only comparable when they come from one network: the TensorFlow 2015
Inception graph, as torch-fidelity's `FeatureExtractorInceptionV3` and pytorch-fid's
`FIDInceptionA/C/E` port it (not torchvision's ImageNet Inception). Its quirks are kept:
the branch average pools leave padding out of the count, the last block max-pools in its
pool branch, BatchNorm eps is 1e-3, and pixels enter as (x - 128) / 128 of 0..255 values
(torch-fidelity and clean-fid; pytorch-fid's 2 * x / 255 - 1 differs by up to 0.8 % at 255).

The weights are the published torch state dict (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, both torchvision-named), or the same names in an
`.npz` / `.safetensors` file so that users without torch convert once (`save_npz`).
Nothing here downloads. The forward is a pure function of that dict of arrays (NHWC
inside, the convolution kernels stay OIHW as stored); parity with torch-fidelity's
network is tested on random weights.

Inputs are 299x299: `resize_for_inception` brings any size there with clean-fid's
"clean" rule (PIL bicubic per channel in float, no quantisation), so the TF1-bilinear
resize that torch-fidelity's network applies to other sizes never happens.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image

from cm3leon_jax import storage
from cm3leon_jax.perception import weights

SIZE = 299
BN_EPS = 1e-3
DIMS = (64, 192, 768, 2048)  # the pooled feature sizes both references offer; FID uses 2048
# How `resize_for_inception` brings images to 299 (for reports next to the FID number).
RESIZE_RULE = ("clean-fid clean: PIL bicubic per channel in float ('F') to 299x299, "
               "clipped to 0..255, not quantised")


def _architecture() -> dict[str, tuple]:
    """name -> (in, out, (kh, kw), stride, (ph, pw)) of every conv + BN + ReLU, in order."""
    spec = {}

    def conv(name, cin, cout, k, stride=1, pad=0):
        k = (k, k) if isinstance(k, int) else k
        pad = (pad, pad) if isinstance(pad, int) else pad
        spec[name] = (cin, cout, k, stride, pad)

    conv("Conv2d_1a_3x3", 3, 32, 3, stride=2)
    conv("Conv2d_2a_3x3", 32, 32, 3)
    conv("Conv2d_2b_3x3", 32, 64, 3, pad=1)
    conv("Conv2d_3b_1x1", 64, 80, 1)
    conv("Conv2d_4a_3x3", 80, 192, 3)
    for m, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        conv(f"{m}.branch1x1", cin, 64, 1)
        conv(f"{m}.branch5x5_1", cin, 48, 1)
        conv(f"{m}.branch5x5_2", 48, 64, 5, pad=2)
        conv(f"{m}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{m}.branch3x3dbl_2", 64, 96, 3, pad=1)
        conv(f"{m}.branch3x3dbl_3", 96, 96, 3, pad=1)
        conv(f"{m}.branch_pool", cin, pool, 1)
    conv("Mixed_6a.branch3x3", 288, 384, 3, stride=2)
    conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, pad=1)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, stride=2)
    for m, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        conv(f"{m}.branch1x1", 768, 192, 1)
        conv(f"{m}.branch7x7_1", 768, c7, 1)
        conv(f"{m}.branch7x7_2", c7, c7, (1, 7), pad=(0, 3))
        conv(f"{m}.branch7x7_3", c7, 192, (7, 1), pad=(3, 0))
        conv(f"{m}.branch7x7dbl_1", 768, c7, 1)
        conv(f"{m}.branch7x7dbl_2", c7, c7, (7, 1), pad=(3, 0))
        conv(f"{m}.branch7x7dbl_3", c7, c7, (1, 7), pad=(0, 3))
        conv(f"{m}.branch7x7dbl_4", c7, c7, (7, 1), pad=(3, 0))
        conv(f"{m}.branch7x7dbl_5", c7, 192, (1, 7), pad=(0, 3))
        conv(f"{m}.branch_pool", 768, 192, 1)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1)
    conv("Mixed_7a.branch3x3_2", 192, 320, 3, stride=2)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), pad=(0, 3))
    conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), pad=(3, 0))
    conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, stride=2)
    for m, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        conv(f"{m}.branch1x1", cin, 320, 1)
        conv(f"{m}.branch3x3_1", cin, 384, 1)
        conv(f"{m}.branch3x3_2a", 384, 384, (1, 3), pad=(0, 1))
        conv(f"{m}.branch3x3_2b", 384, 384, (3, 1), pad=(1, 0))
        conv(f"{m}.branch3x3dbl_1", cin, 448, 1)
        conv(f"{m}.branch3x3dbl_2", 448, 384, 3, pad=1)
        conv(f"{m}.branch3x3dbl_3a", 384, 384, (1, 3), pad=(0, 1))
        conv(f"{m}.branch3x3dbl_3b", 384, 384, (3, 1), pad=(1, 0))
        conv(f"{m}.branch_pool", cin, 192, 1)
    return spec


ARCH = _architecture()


def _expected_shapes() -> dict[str, tuple]:
    """Every weight the network needs -> its shape (torch names and layouts)."""
    out = {}
    for name, (cin, cout, (kh, kw), _, _) in ARCH.items():
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{p}"] = (cout,)
    return out


EXPECTED = _expected_shapes()
# The 1008-way classifier (Inception Score, not FID) ships in both files; kept if present.
OPTIONAL = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


@dataclasses.dataclass(frozen=True, eq=False)
class Inception:
    """The weights (torch names -> float32 arrays) and where they came from."""

    params: dict
    source: str


# ---------------------------------------------------------------------------- forward


def _basic(W, x, name):
    """Conv (no bias) -> BatchNorm in inference mode -> ReLU, as BasicConv2d."""
    _, _, _, stride, (ph, pw) = ARCH[name]
    y = lax.conv_general_dilated(x, W[name + ".conv.weight"], (stride, stride),
                                 ((ph, ph), (pw, pw)),
                                 dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    bn = name + ".bn."
    scale = W[bn + "weight"] / jnp.sqrt(W[bn + "running_var"] + BN_EPS)  # torch's order
    y = y * scale + (W[bn + "bias"] - W[bn + "running_mean"] * scale)
    return jax.nn.relu(y)


def _max_pool(x, stride, pad=0):
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def _avg_pool_no_pad(x):
    """3x3, stride 1, padding 1, the padding left out of the count (TF's SAME average)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


def _block_a(W, x, m):
    b = lambda n, y: _basic(W, y, f"{m}.{n}")
    return jnp.concatenate([
        b("branch1x1", x),
        b("branch5x5_2", b("branch5x5_1", x)),
        b("branch3x3dbl_3", b("branch3x3dbl_2", b("branch3x3dbl_1", x))),
        b("branch_pool", _avg_pool_no_pad(x)),
    ], axis=-1)


def _block_b(W, x, m):
    b = lambda n, y: _basic(W, y, f"{m}.{n}")
    return jnp.concatenate([
        b("branch3x3", x),
        b("branch3x3dbl_3", b("branch3x3dbl_2", b("branch3x3dbl_1", x))),
        _max_pool(x, 2),
    ], axis=-1)


def _block_c(W, x, m):
    b = lambda n, y: _basic(W, y, f"{m}.{n}")
    dbl = x
    for i in range(1, 6):
        dbl = b(f"branch7x7dbl_{i}", dbl)
    return jnp.concatenate([
        b("branch1x1", x),
        b("branch7x7_3", b("branch7x7_2", b("branch7x7_1", x))),
        dbl,
        b("branch_pool", _avg_pool_no_pad(x)),
    ], axis=-1)


def _block_d(W, x, m):
    b = lambda n, y: _basic(W, y, f"{m}.{n}")
    t = x
    for i in range(1, 5):
        t = b(f"branch7x7x3_{i}", t)
    return jnp.concatenate([
        b("branch3x3_2", b("branch3x3_1", x)),
        t,
        _max_pool(x, 2),
    ], axis=-1)


def _block_e(W, x, m, max_pool):
    """InceptionE; the last one (`max_pool`) pools its pool branch by max, as the TF graph."""
    b = lambda n, y: _basic(W, y, f"{m}.{n}")
    t = b("branch3x3_1", x)
    d = b("branch3x3dbl_2", b("branch3x3dbl_1", x))
    pooled = _max_pool(x, 1, pad=1) if max_pool else _avg_pool_no_pad(x)
    return jnp.concatenate([
        b("branch1x1", x),
        b("branch3x3_2a", t), b("branch3x3_2b", t),
        b("branch3x3dbl_3a", d), b("branch3x3dbl_3b", d),
        b("branch_pool", pooled),
    ], axis=-1)


@partial(jax.jit, static_argnames=("dims",))
def forward(W: dict, images: jax.Array, dims: int = 2048) -> jax.Array:
    """Pixels [B, 299, 299, 3] in 0..255 (float) -> spatially averaged features [B, dims]:
    2048 after the last block (FID's pool3), or 64 / 192 / 768 after the first max pool,
    the second max pool and Mixed_6e, as torch-fidelity's features "64" ... "768"."""
    x = (images.astype(jnp.float32) - 128.0) / 128.0
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _basic(W, x, name)
    x = _max_pool(x, 2)
    if dims == 64:
        return x.mean(axis=(1, 2))
    x = _max_pool(_basic(W, _basic(W, x, "Conv2d_3b_1x1"), "Conv2d_4a_3x3"), 2)
    if dims == 192:
        return x.mean(axis=(1, 2))
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(W, x, m)
    x = _block_b(W, x, "Mixed_6a")
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(W, x, m)
    if dims == 768:
        return x.mean(axis=(1, 2))
    x = _block_d(W, x, "Mixed_7a")
    x = _block_e(W, x, "Mixed_7b", max_pool=False)
    x = _block_e(W, x, "Mixed_7c", max_pool=True)
    return x.mean(axis=(1, 2))


def pool_features(inception: Inception, images: np.ndarray, batch_size: int = 50,
                  dims: int = 2048) -> np.ndarray:
    """Images [N, 299, 299, 3] (uint8, or float 0..255 from `resize_for_inception`) ->
    float64 features [N, dims], computed in float32 in batches of `batch_size` (the last
    one padded, so one shape compiles)."""
    if dims not in DIMS:
        raise ValueError(f"dims must be one of {DIMS}, got {dims}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"expected images [N, {SIZE}, {SIZE}, 3], got {images.shape}; "
                         f"resize_for_inception brings other sizes to {SIZE}")
    n = len(images)
    out = np.zeros((n, dims), np.float64)
    batch = max(1, min(batch_size, n))
    for start in range(0, n, batch):
        chunk = images[start:start + batch].astype(np.float32)
        rows = len(chunk)
        if rows < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - rows, *chunk.shape[1:]),
                                                    np.float32)])
        out[start:start + rows] = np.asarray(forward(inception.params, chunk, dims))[:rows]
    return out


# --------------------------------------------------------------------------- resizing


def resize_for_inception(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 3] (uint8 or float 0..255) -> float32 [N, 299, 299, 3] in 0..255.

    The rule is clean-fid's "clean" resize: each channel, as a float ('F') PIL image,
    bicubic-resized to 299x299, clipped to 0..255 and not quantised. Images already
    299x299 pass unchanged (PIL returns them as they are). Resizing here, before the
    network, keeps torch-fidelity's internal TF1-bilinear resize out of the picture.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got {images.shape}")
    if images.shape[1:3] == (SIZE, SIZE):
        return images.astype(np.float32)
    out = np.empty((len(images), SIZE, SIZE, 3), np.float32)
    for i, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32))
            channel = channel.resize((SIZE, SIZE), resample=Image.BICUBIC)
            out[i, :, :, c] = np.asarray(channel).clip(0, 255)
    return out


# ---------------------------------------------------------------------------- weights


def from_state_dict(state: dict, source: str = "<state dict>") -> Inception:
    """Torch-named arrays -> Inception; `source` names the file in errors.

    A `module.` prefix (a DataParallel save) and BatchNorm `num_batches_tracked`
    counters are tolerated; anything else unknown, missing or misshapen is refused."""
    arrays = {key.removeprefix("module."): value for key, value in state.items()
              if not key.endswith(".num_batches_tracked")}
    params = weights.checked(arrays, EXPECTED, str(source),
                             "the FID InceptionV3 weights (inception-2015-12-05)", OPTIONAL)
    return Inception(params=params, source=str(source))


def random_init(seed: int) -> Inception:
    """The network with random weights of the real shapes (He-scaled kernels, identity
    BatchNorms): for tests and speed measurements, never for a reported FID."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in EXPECTED.items():
        if key.endswith("conv.weight"):
            state[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = np.ones(shape)
        else:
            state[key] = np.zeros(shape)
    return from_state_dict(state, f"random-{seed}")


def load_inception(path: storage.PathLike) -> Inception:
    """The FID Inception from a `.pth` (torch-fidelity's or pytorch-fid's state dict,
    same key names in both), an `.npz` or a `.safetensors` file with those names; local or
    on cloud storage (storage.py)."""
    state = weights.read_state_dict(
        path, "the Inception weights",
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth, or an .npz from save_npz")
    return from_state_dict(state, source=str(storage.path(path)))


def save_npz(inception: Inception, path: storage.PathLike) -> None:
    """Write the weights with their torch names, loadable without torch."""
    weights.save_npz(inception.params, path)
