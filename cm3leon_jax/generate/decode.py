"""Decoding: prefill + one token at a time over a KV cache, with guidance, CD-K,
constrained vocabularies and temperature / top-k / top-p sampling (CM3Leon §3.1).

Rows are laid out stream-major, [streams, batch]: stream 0 is the conditional prompt,
stream 1 the unconditional one (the text replaced by `<mask:0>`), stream 2 (two-scale
guidance only) the image-only prompt. Every stream has its own cache rows and its own
prompt length (left padding + segment ids + per-row positions), and all streams of a
sample are fed the one token sampled from their mixed scores — never a copy of the
conditional cache (the DALLE-pytorch bug, prior_art.md §4.2).

Guidance convention: `uncond + scale * (cond - uncond)` on logits; scale 1 is plain
conditional decoding (not `cond + scale * (cond - uncond)`, which shifts the scale by 1).
Guidance and CD-K come first, then temperature, top-k, top-p.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3leon_jax.generate import speculative
from cm3leon_jax.model.transformer import KVCache
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.vocab import Vocab

NEG_INF = -jnp.inf
STREAMS = {"none": 1, "cfg": 2, "two_scale": 3}
PROMPT_ALIGN = 8  # prompt columns are rounded up to this, so similar prompts share a compile


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Static settings of one compiled decoder (hashable: a jit static argument)."""
    mode: Literal["image", "text", "free"]  # allowed ids: image only | no image | any used
    steps: int  # tokens to produce per row
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    guidance: Literal["none", "cfg", "two_scale"] = "none"
    cd_k: int = 5
    cd_sample: bool = True
    stop: tuple[int, ...] = ()  # text mode: a row ends after producing one of these
    min_tokens: int = 0  # text mode: the first this many tokens are text pieces
    jacobi_window: int = 0  # image mode: >= 2 decodes by SJD (speculative.py); 0: one at a time

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not 0 <= self.min_tokens <= self.steps:
            raise ValueError(f"min_tokens={self.min_tokens} must be in [0, steps={self.steps}]")
        if self.jacobi_window and (self.mode != "image" or self.jacobi_window < 2):
            raise ValueError(f"jacobi_window={self.jacobi_window}: speculative decoding needs "
                             "mode='image' and a window >= 2 (0 turns it off)")
        if self.guidance not in STREAMS:
            raise ValueError(f"guidance={self.guidance!r} is not one of {list(STREAMS)}")

    @property
    def streams(self) -> int:
        return STREAMS[self.guidance]


class Scales(NamedTuple):
    """Guidance strengths: traced values, so changing them does not recompile."""
    cfg: float = 1.0  # uncond + cfg (cond - uncond)
    image: float = 1.0  # two-scale: u + image (img - u) + text (full - img)
    text: float = 1.0
    cd_alpha: float = 0.1  # CD-K head threshold


# --- score formulas (pure; pinned by tests with hand-set logits) ---------------------

def cfg_logits(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
    return uncond + scale * (cond - uncond)


def two_scale_logits(full, image_only, uncond, image_scale: float, text_scale: float):
    """InstructPix2Pix-style guidance (Chameleon's InBatchInstructCFG): the image pulls
    away from unconditional, the text away from image-only."""
    return uncond + image_scale * (image_only - uncond) + text_scale * (full - image_only)


def cdk_scores(cond_logp: jax.Array, uncond_logp: jax.Array, alpha: float, k: int):
    """CD-K: log p_cond - log p_uncond on the head {t: p_cond(t) >= alpha * k-th largest
    p_cond}, -inf elsewhere (inputs are log-probabilities over the allowed ids)."""
    kth = jax.lax.top_k(cond_logp, k)[0][..., k - 1:k]
    head = (cond_logp >= kth + jnp.log(alpha)) & (cond_logp > NEG_INF)
    return jnp.where(head, cond_logp - uncond_logp, NEG_INF)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., k - 1:k]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of best tokens whose probability reaches p (at least one)."""
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < p
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def sample(logits: jax.Array, key, temperature: float, top_k: int = 0, top_p: float = 1.0):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def allowed_ids(vocab: Vocab, mode: str) -> np.ndarray:
    """Boolean [vocab.size]: image mode only image ids; text mode neither image ids nor
    <pad>; free mode any used id but <pad>. Padding rows of the table never."""
    ids = np.arange(vocab.size)
    if mode == "image":
        return np.asarray(vocab.is_image(ids))
    used = (ids < vocab.used_size) & (ids != vocab.pad)
    if mode == "text":
        return used & ~np.asarray(vocab.is_image(ids))
    if mode == "free":
        return used
    raise ValueError(f"mode={mode!r} is not one of image, text, free")


def _guided(logits: jax.Array, d: Decoding, scales: Scales):
    """([streams, B, ...] per-stream logits, the guided mix of [B, ...]) of stream-major
    [streams * B, ..., V] logits."""
    s = logits.reshape(d.streams, -1, *logits.shape[1:])
    if d.guidance == "cfg":
        return s, cfg_logits(s[0], s[1], scales.cfg)
    if d.guidance == "two_scale":
        return s, two_scale_logits(s[0], s[2], s[1], scales.image, scales.text)
    return s, s[0]


def choose(logits: jax.Array, key, use_cdk: jax.Array, allowed: jax.Array, d: Decoding,
           scales: Scales):
    """One token per sample from the [streams * B, V] logits of its streams."""
    s, mixed = _guided(logits, d, scales)
    k_sample, k_cd = jax.random.split(key)
    token = sample(jnp.where(allowed, mixed, NEG_INF), k_sample, d.temperature, d.top_k,
                   d.top_p)
    if d.streams == 1:
        return token
    logp = lambda x: jax.nn.log_softmax(jnp.where(allowed, x, NEG_INF), axis=-1)
    scores = cdk_scores(logp(s[0]), logp(s[1]), scales.cd_alpha, d.cd_k)
    greedy = d.temperature == 0 or not d.cd_sample
    cd_token = sample(scores, k_cd, 0.0 if greedy else d.temperature)
    return jnp.where(use_cdk, cd_token, token)


def target_logprobs(logits: jax.Array, use_cdk, allowed, scales: Scales, *, d: Decoding):
    """The log-probabilities `choose` samples from, for [streams * B, ..., V] logits ->
    [B, ..., V]: guidance or CD-K, then temperature, top-k, top-p; a point mass on the
    token `choose` would take where it is greedy. SJD's target (speculative.py)."""
    s, mixed = _guided(logits, d, scales)
    mixed = jnp.where(allowed, mixed, NEG_INF)
    if d.temperature == 0:
        out = speculative.point_mass(mixed)
    else:
        mixed = mixed / d.temperature
        if d.top_k:
            mixed = top_k_filter(mixed, d.top_k)
        if d.top_p < 1:
            mixed = top_p_filter(mixed, d.top_p)
        out = jax.nn.log_softmax(mixed, axis=-1)
    if d.streams == 1:
        return out
    logp = lambda x: jax.nn.log_softmax(jnp.where(allowed, x, NEG_INF), axis=-1)
    scores = cdk_scores(logp(s[0]), logp(s[1]), scales.cd_alpha, d.cd_k)
    if d.temperature == 0 or not d.cd_sample:
        cd = speculative.point_mass(scores)
    else:
        cd = jax.nn.log_softmax(scores / d.temperature, axis=-1)
    return jnp.where(use_cdk.reshape(-1, *[1] * (out.ndim - 1)), cd, out)


def _next(logits, t, key, use_cdk, scales, done, allowed, vocab: Vocab, d: Decoding):
    if d.mode == "text" and d.min_tokens:  # no stop or special id before min_tokens pieces
        text = jnp.asarray(vocab.is_text(np.arange(allowed.shape[0])))
        allowed = allowed & (text | (t >= d.min_tokens))
    token = choose(logits, jax.random.fold_in(key, t), use_cdk, allowed, d, scales)
    if d.mode == "image":
        return token, done
    token = jnp.where(done, vocab.pad, token)
    return token, done | jnp.isin(token, jnp.asarray(d.stop or (-1,), jnp.int32))


def _prompt_layout(tokens: jax.Array, lengths: jax.Array):
    """Left-padded prompts -> (positions, segment ids): real tokens count from 0."""
    P = tokens.shape[1]
    pad = P - lengths[:, None]
    cols = jnp.arange(P)[None, :]
    return jnp.maximum(cols - pad, 0).astype(jnp.int32), (cols >= pad).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "d"))
def decode_cached(graphdef, params, tokens, lengths, use_cdk, scales, key, *, vocab: Vocab,
                  d: Decoding) -> jax.Array:
    """[streams * B, P] left-padded prompts (`lengths` real tokens each) -> [B, steps]."""
    model = nnx.merge(graphdef, params)
    R, P = tokens.shape
    allowed = jnp.asarray(allowed_ids(vocab, d.mode))
    positions, segments = _prompt_layout(tokens, lengths)
    cache = KVCache.zeros(model.cfg, R, P + d.steps)
    hidden, cache = model.extend(tokens, positions, segments, cache, 0)
    logits = model.logits(hidden[:, -1:])[:, 0]
    done = jnp.zeros(R // d.streams, bool)
    ones = jnp.ones((R, 1), jnp.int32)

    def step(carry, t):
        cache, logits, done = carry
        token, done = _next(logits, t, key, use_cdk, scales, done, allowed, vocab, d)
        fed = jnp.tile(token, d.streams)[:, None]
        hidden, cache = model.extend(fed, (lengths + t)[:, None], ones, cache, P + t)
        return (cache, model.logits(hidden)[:, 0], done), token

    _, out = jax.lax.scan(step, (cache, logits, done), jnp.arange(d.steps))
    return out.T


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "d"))
def decode_uncached(graphdef, params, tokens, lengths, use_cdk, scales, key, *,
                    vocab: Vocab, d: Decoding) -> jax.Array:
    """The reference: every step recomputes the whole sequence with the training forward
    pass (`Transformer.__call__`). Same inputs and result as `decode_cached`."""
    R, P = tokens.shape
    allowed = jnp.asarray(allowed_ids(vocab, d.mode))
    buf = jnp.concatenate([tokens, jnp.zeros((R, d.steps), tokens.dtype)], axis=1)
    positions, segments = _prompt_layout(buf, lengths + d.steps)
    done = jnp.zeros(R // d.streams, bool)

    def step(carry, t):
        buf, done = carry
        model = nnx.merge(graphdef, params)  # inside: nnx transforms refuse outer tracers
        hidden = model(buf, positions, segments)
        logits = model.logits(jax.lax.dynamic_slice_in_dim(hidden, P + t - 1, 1, 1))[:, 0]
        token, done = _next(logits, t, key, use_cdk, scales, done, allowed, vocab, d)
        buf = jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.tile(token, d.streams)[:, None], P + t, 1)
        return (buf, done), token

    _, out = jax.lax.scan(step, (buf, done), jnp.arange(d.steps))
    return out.T


def left_pad(prompts: list[np.ndarray], pad: int, align: int = PROMPT_ALIGN):
    """Prompts of different lengths -> ([R, P] right-aligned tokens, [R] lengths)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    P = -(-int(lengths.max()) // align) * align
    tokens = np.full((len(prompts), P), pad, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
    return tokens, lengths


def decode(graphdef, params, vocab: Vocab, streams: list[list[np.ndarray]], d: Decoding,
           scales: Scales = Scales(), *, seed: int = 0, use_cdk=None, mesh=None,
           max_seq_len: int | None = None, cached: bool = True, forwards: bool = False):
    """Decode B samples: `streams[s][b]` is sample b's prompt in stream s (one stream per
    `d.streams`). Returns [B, d.steps] token ids (and with `forwards`, the [B] forward
    passes after the prefill that each sample took: d.steps one at a time, fewer by SJD
    when `d.jacobi_window`). With `mesh`, rows are padded to a multiple of the
    batch-parallel size and split over it like training batches."""
    if len(streams) != d.streams:
        raise ValueError(f"guidance {d.guidance!r} needs {d.streams} prompt streams, "
                         f"got {len(streams)}")
    B = len(streams[0])
    if B == 0 or any(len(s) != B for s in streams):
        raise ValueError(f"every stream needs the same, non-zero number of prompts: "
                         f"{[len(s) for s in streams]}")
    use_cdk = np.zeros(B, bool) if use_cdk is None else np.asarray(use_cdk, bool)
    if use_cdk.shape != (B,):
        raise ValueError(f"use_cdk has shape {use_cdk.shape}, expected ({B},)")
    if use_cdk.any() and d.streams < 2:
        raise ValueError("CD-K needs the unconditional stream (guidance cfg or two_scale)")
    longest = max(len(p) for s in streams for p in s)
    if max_seq_len is not None and longest + d.steps > max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens + {d.steps} new tokens exceeds "
                         f"model.max_seq_len={max_seq_len}")
    Bp = B
    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        while (Bp * d.streams) % dp:
            Bp += 1
    rows = [np.asarray(p, np.int32) for s in streams for p in s + [s[-1]] * (Bp - B)]
    tokens, lengths = left_pad(rows, vocab.pad)
    use_cdk = np.concatenate([use_cdk, np.zeros(Bp - B, bool)])
    fn = decode_cached if cached else decode_uncached
    if d.jacobi_window:
        fn = functools.partial(_decode_jacobi, cached=cached)
    scales = Scales(*np.asarray(scales, np.float32))
    key = jax.random.key(seed)
    if mesh is None:
        out = fn(graphdef, params, tokens, lengths, use_cdk, scales, key, vocab=vocab, d=d)
    else:
        with jax.set_mesh(mesh):
            rows = [jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim))
                    for a in (tokens, lengths)]
            out = fn(graphdef, params, *rows, use_cdk, scales, key, vocab=vocab, d=d)
    if not d.jacobi_window:
        out = (out, np.full(Bp, d.steps, np.int32))
    tokens, passes = (np.asarray(a)[:B] for a in out)
    return (tokens, passes) if forwards else tokens


def _decode_jacobi(graphdef, params, tokens, lengths, use_cdk, scales, key, *, vocab, d,
                   cached):
    if not cached:
        raise ValueError("speculative decoding (jacobi_window) runs over the KV cache only")
    allowed = jnp.asarray(allowed_ids(vocab, d.mode))
    return speculative.decode_jacobi(graphdef, params, tokens, lengths, allowed,
                                     (use_cdk, allowed, scales), key, target=target_logprobs,
                                     d=d)
