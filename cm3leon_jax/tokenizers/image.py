"""The image tokenizer: uint8 RGB images <-> VQ codebook indices (not vocabulary ids).

Encode and decode run a jitted function of one fixed batch shape; inputs are split into
batches of `batch_size` and the last one is zero-padded, so any number of images compiles
once. A saved tokenizer is a directory with `vqgan.json` (config) and `vqgan.npz` (weights),
local or on cloud storage (storage.py); each file is written whole. Keys missing from a
`vqgan.json` take their defaults, and every option added to `vqgan` since the first saved
tokenizers (`codebook_l2_norm`, `codebook_dim`) defaults to the model as it was, so older
tokenizers load unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError, VQGANConfig
from cm3leon_jax.config.loader import build
from cm3leon_jax.model.vqgan import VQGAN

CONFIG_FILE = "vqgan.json"
PARAMS_FILE = "vqgan.npz"


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def graphdef(cfg: VQGANConfig):
    return nnx.graphdef(nnx.eval_shape(lambda: VQGAN(cfg, rngs=nnx.Rngs(0))))


def init_like(abstract: dict, seed: int) -> dict:
    """Random weights for a tree of parameter shapes, drawn with numpy by parameter name.

    Kernels ~ N(0, 1/fan_in) (LeCun normal, as flax's default), biases 0, norm scales 1, a
    codebook of K rows uniform(-1/K, 1/K) (taming). numpy, because an XLA program of ~100
    random initializers takes 20-60 s to compile on a small CPU, longer than the model it
    builds.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = str(getattr(path[-1], "key", path[-1])), leaf.shape
        if name == "codebook":
            value = rng.uniform(-1.0 / shape[0], 1.0 / shape[0], shape)
        elif name == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        else:
            value = np.ones(shape) if name == "scale" else np.zeros(shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def abstract_params(make_module) -> dict:
    """Parameter shapes of the module `make_module(rngs)` builds, without building it."""
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: make_module(nnx.Rngs(0))),
                                      nnx.Param))


def init_params(cfg: VQGANConfig, seed: int = 0) -> dict:
    """Randomly initialised VQ-GAN weights as a plain nested dict."""
    return init_like(abstract_params(lambda rngs: VQGAN(cfg, rngs=rngs)), seed)


@functools.lru_cache(maxsize=None)
def _jitted(cfg: VQGANConfig):
    """encode and decode programs, shared by every tokenizer of this config."""
    gdef, side = graphdef(cfg), cfg.latent_size

    def encode(p, images):
        codes = nnx.merge(gdef, p).encode(to_float(images))
        return codes.reshape(codes.shape[0], -1)

    def decode(p, codes):
        grid = codes.reshape(codes.shape[0], side, side)
        return to_uint8(nnx.merge(gdef, p).decode(grid))

    return jax.jit(encode), jax.jit(decode)


def flatten(params: dict) -> dict[str, np.ndarray]:
    """{"encoder/down/0/block/1/conv1/kernel": array, ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in leaves}


def unflatten(flat: dict[str, np.ndarray], like: dict, where: str) -> dict:
    """Rebuild the nested dict `like` from `flat`, checking every name and shape."""
    expected = flatten(jax.tree.map(lambda a: np.zeros((0,)), like))
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for path, ref in paths:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if flat[name].shape != ref.shape:
            raise ValueError(f"{where}: {name} has shape {flat[name].shape}, the config "
                             f"needs {ref.shape}")
        out.append(jnp.asarray(flat[name], jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


class ImageTokenizer:
    """uint8 [B, H, W, 3] <-> int32 codes [B, tokens_per_image] (row-major latent grid)."""

    def __init__(self, config: VQGANConfig, params: dict, batch_size: int = 32):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        self.config, self.params, self.batch_size = config, params, batch_size
        self._encode, self._decode = _jitted(config)

    @classmethod
    def create(cls, config: VQGANConfig, seed: int = 0, batch_size: int = 32):
        """An untrained tokenizer (random weights)."""
        config.check()
        return cls(config, init_params(config, seed), batch_size)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        n, bs = len(x), self.batch_size
        outs = []
        for i in range(0, n, bs):
            chunk = x[i:i + bs]
            if len(chunk) < bs:
                pad = np.zeros((bs - len(chunk),) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(np.asarray(fn(self.params, chunk))[:min(bs, n - i)])
        return np.concatenate(outs) if outs else None

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, R, R, 3] -> int32 [B, tokens_per_image], codes in 0..codebook_size-1."""
        images = np.asarray(images)
        r = self.resolution
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"images must have shape [B, {r}, {r}, 3], got {images.shape}")
        out = self._batched(self._encode, images)
        return np.zeros((0, self.tokens_per_image), np.int32) if out is None else out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int [B, tokens_per_image] codes -> uint8 [B, R, R, 3]."""
        codes = np.asarray(codes)
        t, k, r = self.tokens_per_image, self.codebook_size, self.resolution
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != t:
            raise ValueError(f"codes must have shape [B, {t}], got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"codes must lie in [0, {k}); got {codes.min()}..{codes.max()}")
        out = self._batched(self._decode, codes.astype(np.int32))
        return np.zeros((0, r, r, 3), np.uint8) if out is None else out

    def save(self, directory: storage.PathLike) -> None:
        d = storage.path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with storage.staged_file(d / PARAMS_FILE) as tmp, tmp.open("wb") as f:
            np.savez(f, **flatten(self.params))
        storage.write_text_atomic(d / CONFIG_FILE,
                                  json.dumps(dataclasses.asdict(self.config), indent=1))

    @staticmethod
    def saved(directory: storage.PathLike) -> bool:
        """Both files are there (on cloud storage a directory exists with its first file)."""
        d = storage.path(directory)
        return all((d / name).exists() for name in (CONFIG_FILE, PARAMS_FILE))

    @classmethod
    def load(cls, directory: storage.PathLike, batch_size: int = 32) -> "ImageTokenizer":
        d = storage.path(directory)
        for name in (CONFIG_FILE, PARAMS_FILE):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d / name} does not exist (not a saved image tokenizer)")
        try:
            config = build(VQGANConfig, json.loads((d / CONFIG_FILE).read_text()), "vqgan")
            config.check()
        except (ConfigError, json.JSONDecodeError) as e:
            raise ValueError(f"{d / CONFIG_FILE}: {e}") from None
        like = abstract_params(lambda rngs: VQGAN(config, rngs=rngs))
        with (d / PARAMS_FILE).open("rb") as f, np.load(f) as npz:
            params = unflatten(dict(npz), like, str(d / PARAMS_FILE))
        return cls(config, params, batch_size)
