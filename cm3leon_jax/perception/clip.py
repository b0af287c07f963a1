"""CLIP (ViT image tower + causal text tower) in JAX, from a transformers `CLIPModel` folder.

Why not transformers: evaluation and reranking run inside JAX jobs, and torch is an optional
extra. This is the same computation written against the safetensors arrays, tested equal to
`CLIPModel.get_image_features` / `get_text_features` and to the PIL `CLIPImageProcessor` on
random weights (tests/test_clip.py):

- a folder as `CLIPModel.save_pretrained` writes it (`config.json`, `model.safetensors` or a
  sharded `model.safetensors.index.json`) with the processor saved next to it
  (`tokenizer.json`; `preprocessor_config.json` is optional: OpenAI's defaults otherwise);
- any ViT size from config.json: pre-LN blocks, `pre_layrnorm` on the vision embeddings, the
  class token through `post_layernorm`; text with a causal mask, pooled at the eos token the
  way transformers 5 picks it (`eos_token_id == 2`, the legacy configs such as OpenAI's: the
  position of the largest id; otherwise the first position holding `eos_token_id`);
- preprocessing as the PIL `CLIPImageProcessor`: shortest side resized bicubic by PIL, centre
  crop, rescale in float64, normalise in float32;
- every matmul at `Precision.HIGHEST`, so accelerators give the float32 numbers a metric needs.

Embeddings come back L2-normalised (float32 numpy), so a dot product is the cosine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from PIL import Image

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.storage import Path

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HIGHEST = jax.lax.Precision.HIGHEST
# transformers' CLIPTextConfig / CLIPVisionConfig defaults (ViT-B/32), for keys a config omits
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class Tower:
    """The static shape of one transformer tower (a jit static argument)."""
    layers: int
    heads: int
    eps: float
    act: str


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """`CLIPImageProcessor` settings (preprocessor_config.json, or OpenAI's defaults)."""
    resize: tuple | None  # ("shortest_edge", n) or ("exact", h, w); None: no resize
    crop: tuple[int, int] | None  # (h, w); None: no centre crop
    resample: int  # a PIL resampling filter (3: bicubic)
    rescale: float | None  # multiply by it (float64), None: no rescale
    mean: tuple[float, ...] | None  # None: no normalisation
    std: tuple[float, ...] | None


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
    """A loaded CLIP: `params` (a pytree of jax arrays), tower shapes, tokenizer, settings."""
    params: dict
    vision: Tower
    text: Tower
    image_size: int
    patch_size: int
    projection_dim: int
    max_length: int  # text tokens, <|startoftext|> and <|endoftext|> included
    eos_token_id: int  # from config.json's text_config: selects the pooled position
    pad_id: int
    tokenizer: tokenizers.Tokenizer
    prep: Preprocess
    path: str

    def preprocess(self, images) -> np.ndarray:
        """uint8 images ([N, H, W, 3] or a list of [H, W, 3] / [H, W] of any sizes) ->
        float32 [N, S, S, 3], channels last, exactly as the PIL `CLIPImageProcessor`."""
        out = [_preprocess_one(_as_rgb_uint8(im, i), self.prep) for i, im in
               enumerate(images)]
        if not out:
            return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        return np.stack(out)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids, mask), int32 [N, max_length]: <|startoftext|> text <|endoftext|>,
        truncated keeping the eos (as the tokenizer with truncation=True, max_length), padded
        on the right with the tokenizer's pad id."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, not one string")
        encs = self.tokenizer.encode_batch(list(texts)) if texts else []
        ids = np.full((len(encs), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(encs), self.max_length), np.int32)
        for r, e in enumerate(encs):
            ids[r, :len(e.ids)] = e.ids
            mask[r, :len(e.ids)] = 1
        return ids, mask


# --- loading --------------------------------------------------------------------------------

def _need(path: Path, name: str, what: str) -> Path:
    f = path / name
    if not f.is_file():
        raise ConfigError(f"{path}: no {name} ({what})")
    return f


def _load_safetensors(f: Path) -> dict[str, np.ndarray]:
    if storage.is_remote(f):  # safetensors opens local files only
        return safetensors.numpy.load(f.read_bytes())
    return safetensors.numpy.load_file(str(f))


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(_load_safetensors(_need(path, shard, f"a shard named by {index.name}")))
        return out
    raise ConfigError(f"{path}: no model.safetensors nor model.safetensors.index.json (save the "
                      f"model with CLIPModel.save_pretrained; .bin weights are not read)")


def _tower_config(cfg: dict, key: str, defaults: dict) -> dict:
    sub = cfg.get(key) or {}
    out = {**defaults, **{k: v for k, v in sub.items() if v is not None}}
    if out["hidden_act"] not in _ACTS:
        raise ConfigError(f"{key}.hidden_act {out['hidden_act']!r}: supported are "
                          f"{sorted(_ACTS)}")
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ConfigError(f"{key}: hidden_size {out['hidden_size']} is not a multiple of "
                          f"num_attention_heads {out['num_attention_heads']}")
    return out


def _stack_layers(W: dict, prefix: str, n: int) -> dict:
    """The n encoder layers as arrays with a leading layer axis; matmul weights as [in, out],
    q, k, v fused into one [D, 3D]."""
    def get(i, name):
        key = f"{prefix}.encoder.layers.{i}.{name}"
        if key not in W:
            raise ConfigError(f"no weight {key} (not a transformers CLIPModel checkpoint?)")
        return W[key]

    def stack(fn):
        return jnp.asarray(np.stack([fn(i) for i in range(n)]).astype(np.float32))

    att = "self_attn."
    return {
        "ln1_w": stack(lambda i: get(i, "layer_norm1.weight")),
        "ln1_b": stack(lambda i: get(i, "layer_norm1.bias")),
        "qkv_w": stack(lambda i: np.concatenate([get(i, att + p + "_proj.weight").T
                                                 for p in "qkv"], 1)),
        "qkv_b": stack(lambda i: np.concatenate([get(i, att + p + "_proj.bias")
                                                 for p in "qkv"])),
        "out_w": stack(lambda i: get(i, att + "out_proj.weight").T),
        "out_b": stack(lambda i: get(i, att + "out_proj.bias")),
        "ln2_w": stack(lambda i: get(i, "layer_norm2.weight")),
        "ln2_b": stack(lambda i: get(i, "layer_norm2.bias")),
        "fc1_w": stack(lambda i: get(i, "mlp.fc1.weight").T),
        "fc1_b": stack(lambda i: get(i, "mlp.fc1.bias")),
        "fc2_w": stack(lambda i: get(i, "mlp.fc2.weight").T),
        "fc2_b": stack(lambda i: get(i, "mlp.fc2.bias")),
    }


def _params(W: dict, vcfg: dict, tcfg: dict) -> dict:
    def a(name, transpose=False):
        if name not in W:
            raise ConfigError(f"no weight {name} (not a transformers CLIPModel checkpoint?)")
        x = W[name].astype(np.float32)
        return jnp.asarray(x.T if transpose else x)

    patch = W["vision_model.embeddings.patch_embedding.weight"]  # [D, C, P, P] (Conv2d)
    D = patch.shape[0]
    v, t = "vision_model.", "text_model."
    return {
        "vision": {
            "class_embedding": a(v + "embeddings.class_embedding"),
            # rows in (py, px, c) order: a patch of a channels-last image, flattened
            "patch": jnp.asarray(patch.transpose(2, 3, 1, 0).reshape(-1, D).astype(np.float32)),
            "position": a(v + "embeddings.position_embedding.weight"),
            "pre_ln_w": a(v + "pre_layrnorm.weight"), "pre_ln_b": a(v + "pre_layrnorm.bias"),
            "layers": _stack_layers(W, "vision_model", vcfg["num_hidden_layers"]),
            "post_ln_w": a(v + "post_layernorm.weight"),
            "post_ln_b": a(v + "post_layernorm.bias"),
            "projection": a("visual_projection.weight", transpose=True),
        },
        "text": {
            "token": a(t + "embeddings.token_embedding.weight"),
            "position": a(t + "embeddings.position_embedding.weight"),
            "layers": _stack_layers(W, "text_model", tcfg["num_hidden_layers"]),
            "final_ln_w": a(t + "final_layer_norm.weight"),
            "final_ln_b": a(t + "final_layer_norm.bias"),
            "projection": a("text_projection.weight", transpose=True),
        },
    }


def _size_rule(size, where: Path) -> tuple | None:
    if isinstance(size, int):  # old processors: an int is the shortest edge
        return ("shortest_edge", size)
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            return ("shortest_edge", int(size["shortest_edge"]))
        if set(size) == {"height", "width"}:
            return ("exact", int(size["height"]), int(size["width"]))
    raise ConfigError(f"{where}: size {size!r} not supported (shortest_edge, or height and "
                      f"width)")


def _crop_rule(crop, where: Path) -> tuple[int, int]:
    if isinstance(crop, int):
        return (crop, crop)
    if isinstance(crop, dict) and {"height", "width"} <= set(crop):
        return (int(crop["height"]), int(crop["width"]))
    raise ConfigError(f"{where}: crop_size {crop!r} not supported (height and width)")


def _preprocess_config(path: Path, image_size: int) -> Preprocess:
    f = path / "preprocessor_config.json"
    p = json.loads(f.read_text()) if f.is_file() else {}
    return Preprocess(
        resize=(_size_rule(p.get("size", {"shortest_edge": image_size}), f)
                if p.get("do_resize", True) else None),
        crop=(_crop_rule(p.get("crop_size", image_size), f)
              if p.get("do_center_crop", True) else None),
        resample=int(p.get("resample", Image.Resampling.BICUBIC)),
        rescale=float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else None,
        mean=tuple(p.get("image_mean", OPENAI_CLIP_MEAN)) if p.get("do_normalize", True)
        else None,
        std=tuple(p.get("image_std", OPENAI_CLIP_STD)) if p.get("do_normalize", True) else None,
    )


def _tokenizer(path: Path, max_length: int) -> tuple[tokenizers.Tokenizer, int]:
    f = path / "tokenizer.json"
    if not f.is_file():
        raise ConfigError(f"{path}: no tokenizer.json (save the processor next to the model: "
                          f"CLIPProcessor.from_pretrained(...).save_pretrained({str(path)!r}))")
    tok = tokenizers.Tokenizer.from_str(f.read_text())
    pad_id = (tok.padding or {}).get("pad_id")
    if pad_id is None:
        tc = path / "tokenizer_config.json"
        pad = json.loads(tc.read_text()).get("pad_token") if tc.is_file() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None:
        pad_id = tok.token_to_id("<|endoftext|>")
    tok.no_padding()
    tok.enable_truncation(max_length)  # counts the special tokens, keeps the eos
    return tok, int(pad_id or 0)


def load_clip(path: storage.PathLike) -> Clip:
    """A `CLIPModel.save_pretrained` folder with its processor saved next to it -> `Clip`,
    local or on cloud storage (storage.py)."""
    path = storage.path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such CLIP model directory")
    cfg = json.loads(_need(path, "config.json", "save the model with "
                                                "CLIPModel.save_pretrained").read_text())
    tcfg = _tower_config(cfg, "text_config", _TEXT_DEFAULTS)
    vcfg = _tower_config(cfg, "vision_config", _VISION_DEFAULTS)
    if vcfg["image_size"] % vcfg["patch_size"]:
        raise ConfigError(f"{path}: image_size {vcfg['image_size']} is not a multiple of "
                          f"patch_size {vcfg['patch_size']}")
    eos = tcfg["eos_token_id"]
    if not isinstance(eos, int):
        raise ConfigError(f"{path}: text_config.eos_token_id {eos!r}: one integer expected")
    tok, pad_id = _tokenizer(path, tcfg["max_position_embeddings"])
    W = _read_weights(path)
    params = _params(W, vcfg, tcfg)
    tower = lambda c: Tower(c["num_hidden_layers"], c["num_attention_heads"],
                            float(c["layer_norm_eps"]), c["hidden_act"])
    return Clip(params=params, vision=tower(vcfg), text=tower(tcfg),
                image_size=vcfg["image_size"], patch_size=vcfg["patch_size"],
                projection_dim=int(params["vision"]["projection"].shape[1]),
                max_length=tcfg["max_position_embeddings"], eos_token_id=eos, pad_id=pad_id,
                tokenizer=tok, prep=_preprocess_config(path, vcfg["image_size"]),
                path=str(path))


# --- preprocessing --------------------------------------------------------------------------

def _as_rgb_uint8(im, i: int) -> np.ndarray:
    im = np.asarray(im)
    if im.dtype != np.uint8:
        raise ValueError(f"image {i}: uint8 pixels expected, got {im.dtype}")
    if im.ndim == 3 and im.shape[-1] == 1:
        im = im[..., 0]
    if im.ndim == 2:  # grayscale: repeated, as convert_to_rgb does
        return np.repeat(im[..., None], 3, axis=-1)
    if im.ndim != 3 or im.shape[-1] != 3:
        raise ValueError(f"image {i}: [H, W, 3] or [H, W] expected, got shape {im.shape}")
    return im


def _center_crop(im: np.ndarray, h: int, w: int) -> np.ndarray:
    """transformers' `center_crop`: zero padding first where the image is smaller."""
    H, W = im.shape[:2]
    top, left = (H - h) // 2, (W - w) // 2
    if top >= 0 and left >= 0:
        return im[top:top + h, left:left + w]
    nh, nw = max(h, H), max(w, W)
    padded = np.zeros((nh, nw) + im.shape[2:], im.dtype)
    tp, lp = math.ceil((nh - H) / 2), math.ceil((nw - W) / 2)
    padded[tp:tp + H, lp:lp + W] = im
    top, left = top + tp, left + lp
    return padded[max(0, top):min(nh, top + h), max(0, left):min(nw, left + w)]


def _preprocess_one(im: np.ndarray, prep: Preprocess) -> np.ndarray:
    if prep.resize is not None:
        H, W = im.shape[:2]
        if prep.resize[0] == "shortest_edge":
            s = prep.resize[1]
            short, long = (W, H) if W <= H else (H, W)
            new_long = int(s * long / short)
            h, w = (new_long, s) if W <= H else (s, new_long)
        else:
            h, w = prep.resize[1:]
        im = np.asarray(Image.fromarray(im).resize((w, h), resample=prep.resample))
    if prep.crop is not None:
        im = _center_crop(im, *prep.crop)
    x = im
    if prep.rescale is not None:
        x = (x.astype(np.float64) * prep.rescale).astype(np.float32)
    if prep.mean is not None:
        x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
        x = (x - np.asarray(prep.mean, x.dtype)) / np.asarray(prep.std, x.dtype)
    return np.asarray(x, np.float32)


# --- the towers -----------------------------------------------------------------------------

def _ln(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def _mm(x, w):
    return jnp.matmul(x, w, precision=_HIGHEST)


def _encoder(x, layers: dict, tower: Tower, bias):
    """Pre-LN transformer blocks over x [B, T, D]; `bias` [B or 1, 1, T, T] is added to the
    attention logits."""
    B, T, D = x.shape
    H = tower.heads
    act = _ACTS[tower.act]

    def block(x, p):
        h = _ln(x, p["ln1_w"], p["ln1_b"], tower.eps)
        qkv = (_mm(h, p["qkv_w"]) + p["qkv_b"]).reshape(B, T, 3, H, D // H)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=_HIGHEST) * (D // H) ** -0.5
        att = jax.nn.softmax(logits + bias, -1)
        o = jnp.einsum("bhqk,bhkd->bqhd", att, v, precision=_HIGHEST).reshape(B, T, D)
        x = x + _mm(o, p["out_w"]) + p["out_b"]
        h = _ln(x, p["ln2_w"], p["ln2_b"], tower.eps)
        h = _mm(act(_mm(h, p["fc1_w"]) + p["fc1_b"]), p["fc2_w"]) + p["fc2_b"]
        return x + h, None

    return jax.lax.scan(block, x, layers)[0]


def _unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@partial(jax.jit, static_argnames=("tower", "patch"))
def image_features(params: dict, pixels: jax.Array, tower: Tower, patch: int) -> jax.Array:
    """Preprocessed images [B, S, S, 3] -> unit image embeddings [B, projection_dim]."""
    p = params["vision"]
    B, S, _, C = pixels.shape
    g = S // patch
    x = pixels.reshape(B, g, patch, g, patch, C).transpose(0, 1, 3, 2, 4, 5)
    x = _mm(x.reshape(B, g * g, patch * patch * C), p["patch"])
    cls = jnp.broadcast_to(p["class_embedding"], (B, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], 1) + p["position"][:g * g + 1]
    x = _ln(x, p["pre_ln_w"], p["pre_ln_b"], tower.eps)
    x = _encoder(x, p["layers"], tower, jnp.zeros((1, 1, 1, 1), x.dtype))
    pooled = _ln(x[:, 0], p["post_ln_w"], p["post_ln_b"], tower.eps)
    return _unit(_mm(pooled, p["projection"]))


@partial(jax.jit, static_argnames=("tower", "eos_token_id"))
def text_features(params: dict, ids: jax.Array, mask: jax.Array, tower: Tower,
                  eos_token_id: int) -> jax.Array:
    """Token ids and mask [B, T] -> unit text embeddings [B, projection_dim]."""
    p = params["text"]
    B, T = ids.shape
    x = p["token"][ids] + p["position"][:T]
    causal = jnp.tril(jnp.ones((T, T), bool))
    allowed = causal[None, None] & (mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    x = _encoder(x, p["layers"], tower, bias)
    x = _ln(x, p["final_ln_w"], p["final_ln_b"], tower.eps)
    if eos_token_id == 2:  # legacy configs: transformers pools at the largest id
        pos = jnp.argmax(ids, -1)
    else:  # the first eos (0 when there is none, as transformers' argmax)
        pos = jnp.argmax(ids == eos_token_id, -1)
    pooled = x[jnp.arange(B), pos]
    return _unit(_mm(pooled, p["projection"]))


# --- the public functions -------------------------------------------------------------------

def _chunks(n: int, batch_size: int):
    """(start, stop, padded size): batches of `batch_size`, the last one padded; fewer rows
    than that pad to a power of two, so calls of any size compile few shapes."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    size = batch_size if n >= batch_size else min(batch_size, 1 << max(n - 1, 0).bit_length())
    for s in range(0, n, size):
        yield s, min(s + size, n), size


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)])


def embed_images(clip: Clip, images, batch_size: int = 64) -> np.ndarray:
    """uint8 images ([N, H, W, 3] or a list of [H, W, 3] of any sizes) -> unit float32
    embeddings [N, projection_dim]; preprocessed a batch at a time."""
    n = len(images)
    out = np.zeros((n, clip.projection_dim), np.float32)
    for s, e, size in _chunks(n, batch_size):
        pixels = clip.preprocess([images[i] for i in range(s, e)])
        if pixels.shape[1:3] != (clip.image_size, clip.image_size):
            raise ConfigError(f"{clip.path}: preprocessing gives {pixels.shape[1:3]} images, the "
                              f"model takes {clip.image_size}x{clip.image_size}")
        feats = image_features(clip.params, _pad_rows(pixels, size), clip.vision,
                               clip.patch_size)
        out[s:e] = np.asarray(feats)[:e - s]
    return out


def embed_texts(clip: Clip, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Texts -> unit float32 embeddings [N, projection_dim] (texts over max_length tokens are
    truncated, keeping their eos)."""
    ids, mask = clip.tokenize(texts)
    out = np.zeros((len(ids), clip.projection_dim), np.float32)
    for s, e, size in _chunks(len(ids), batch_size):
        feats = text_features(clip.params, _pad_rows(ids[s:e], size),
                              _pad_rows(mask[s:e], size), clip.text, clip.eos_token_id)
        out[s:e] = np.asarray(feats)[:e - s]
    return out


def pair_cosines(clip: Clip, images, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Cosine of each (image, text) pair, float64 [N] (images and texts paired by index)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    img = embed_images(clip, images, batch_size).astype(np.float64)
    txt = embed_texts(clip, list(texts), batch_size).astype(np.float64)
    return (img * txt).sum(-1)
