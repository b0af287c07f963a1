"""Speculative Jacobi decoding (SJD, Teng et al. 2024) of image tokens: a window of W tokens
per forward pass instead of one, with the sampled distribution unchanged.

Contract: `decode_jacobi` takes what `decode.decode_cached` takes (stream-major left-padded
rows, per-row lengths) and returns the same kind of tokens [B, steps], plus the forward
passes each sample needed. The target is the distribution `decode.choose` samples from (the
guided, filtered `target` log-probabilities); with temperature 0 that is a point mass, and
the tokens equal greedy autoregressive decoding's.

Sequence index s: 0 is the prompt's last token, s = 1 + j is image token j. Each iteration
feeds seq[m : m + W] (cache columns P-1+m ..), whose outputs are the target at seq[m+1 ..
m+W] given the tokens before. A draft d at an undecided index, drawn from q, is accepted
with probability min(1, p(d) / q(d)); at a row's first rejection the token is drawn from
norm(max(0, p - q)) (speculative sampling, Leviathan et al. 2023), so each token is
distributed as p. The undecided indices after it get new drafts drawn from this pass's
outputs (the Jacobi update, q := that output); indices beyond the outputs get uniform draws
over the allowed ids.

Batching: every row has its own write index m (its last decided index; `Transformer.extend`
takes a start column per row), so a row's passes depend on its own acceptances only; the
loop runs until every row has its tokens, and finished rows idle. A window starts at the
row's last decided token, which rewrites that token's cache column (it may hold a rejected
draft's keys). A static cache needs no rollback: a rejected draft's cache slot lies after
the write index, where the causal mask hides it, until a later pass overwrites it.

The target comes in as a static function (`decode.target_logprobs`) so that this module
does not import decode.py, which dispatches here: no import cycle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.model.transformer import KVCache

NEG_INF = -jnp.inf


def point_mass(scores: jax.Array) -> jax.Array:
    """log-probabilities of argmax(scores): greedy as a distribution (0 there, -inf else)."""
    best = jnp.argmax(scores, axis=-1)[..., None]
    return jnp.where(jnp.arange(scores.shape[-1]) == best, 0.0, NEG_INF)


def verify(key, drafts, logq, logp, decided):
    """The speculative-sampling rule along a window, per row.

    drafts [B, W] ids drawn from logq [B, W, V]; logp [B, W, V] the target at the same
    indices; decided [B, W] indices already fixed (accepted without a test). Returns
    (tokens [B, W], n [B]): the first n entries of `tokens` are final — the accepted drafts
    then, at the first rejection, a draw from norm(max(0, p - q)).
    """
    k_u, k_r = jax.random.split(key)
    pick = lambda a: jnp.take_along_axis(a, drafts[..., None], -1)[..., 0]
    log_u = jnp.log(jax.random.uniform(k_u, drafts.shape))
    ok = decided | (log_u < pick(logp) - pick(logq))
    W = drafts.shape[1]
    first = jnp.argmin(jnp.concatenate([ok, jnp.zeros_like(ok[:, :1])], 1), axis=1)  # [B]
    rest = jnp.maximum(jnp.exp(logp) - jnp.exp(logq), 0.0)
    # p == q up to rounding leaves nothing: then p itself (the two agree)
    rest = jnp.where(rest.sum(-1, keepdims=True) > 0, jnp.log(rest), logp)
    at = jnp.minimum(first, W - 1)[:, None]
    redraw = jax.random.categorical(
        k_r, jnp.take_along_axis(rest, at[..., None], 1)[:, 0], axis=-1).astype(drafts.dtype)
    tokens = jnp.where(jnp.arange(W)[None] == first[:, None], redraw[:, None], drafts)
    return tokens, jnp.minimum(first + 1, W)


@functools.partial(jax.jit, static_argnames=("graphdef", "target", "d"))
def decode_jacobi(graphdef, params, tokens, lengths, allowed, aux, key, *, target, d):
    """[streams * B, P] left-padded prompts -> ([B, d.steps] tokens, [B] forward passes).

    `target(logits [streams*B, W, V], *aux, d=d)` -> the log-probabilities [B, W, V] that
    `decode.choose` samples from; `allowed` [V] the ids a draft may take.
    """
    model = nnx.merge(graphdef, params)
    R, P = tokens.shape
    S, W, steps = d.streams, d.jacobi_window, d.steps
    B = R // S
    L = steps + W + 1  # seq indices a window reads or verifies while a row is unfinished
    positions, segments = _layout(tokens, lengths)
    cache = KVCache.zeros(model.cfg, R, P + steps + W)
    _, cache = model.extend(tokens[:, :-1], positions[:, :-1], segments[:, :-1], cache, 0)
    init_logq = jnp.where(allowed, -jnp.log(allowed.sum()), NEG_INF)
    init_q = jnp.broadcast_to(init_logq, (B, W, allowed.shape[0]))
    uniform = lambda k: jax.random.categorical(k, init_q, axis=-1).astype(jnp.int32)  # [B, W]
    k_init, key = jax.random.split(key)
    seq = jnp.zeros((B, L), jnp.int32).at[:, 1:W + 1].set(uniform(k_init))
    decided = jnp.ones(B, jnp.int32)  # seq[:decided] is final; seq[0] the prompt's
    top = model.cfg.max_seq_len - 1  # drafts past the last image token: any valid position
    cols = jnp.arange(W)

    def body(carry):
        cache, seq, logq, decided, forwards, it = carry
        k = jax.random.fold_in(key, it)
        k_verify, k_draft, k_init = jax.random.split(k, 3)
        active = decided <= steps
        m = jnp.where(active, decided - 1, 0)  # [B] each row's last decided index
        rows = jnp.tile(m, S)  # the same index for a sample's every stream
        win = jnp.take_along_axis(seq, m[:, None] + cols, 1)
        fed = jnp.tile(win, (S, 1))
        fed = fed.at[:, 0].set(jnp.where(rows == 0, tokens[:, -1], fed[:, 0]))
        pos = jnp.minimum(lengths[:, None] - 1 + rows[:, None] + cols, top)
        hidden, cache = model.extend(fed, pos, jnp.ones_like(fed), cache, P - 1 + rows)
        logp = target(model.logits(hidden), *aux, d=d)  # at seq[m+1 .. m+W]
        drafts = jnp.take_along_axis(seq, m[:, None] + 1 + cols, 1)
        new, n = verify(k_verify, drafts, logq, logp, jnp.zeros(drafts.shape, bool))
        n = jnp.where(active, n, 0)
        # Jacobi: undecided indices the pass reached draw new drafts from its outputs
        jacobi = jax.random.categorical(k_draft, logp, axis=-1).astype(jnp.int32)
        now = jnp.where(cols[None] < n[:, None], new, jacobi)
        s = jnp.arange(L)[None]
        inside = (s >= m[:, None] + 1) & (s <= m[:, None] + W)
        seq = jnp.where(inside & active[:, None], jnp.take_along_axis(
            now, jnp.clip(s - m[:, None] - 1, 0, W - 1), 1), seq)
        decided = jnp.where(active, m + 1 + n, decided)
        # the next window's drafts: this pass's outputs where it reached, else uniform
        m2 = decided - 1
        nxt = m2[:, None] + 1 + cols
        logq = jnp.where((nxt <= m[:, None] + W)[..., None], jnp.take_along_axis(
            logp, jnp.clip(nxt - m[:, None] - 1, 0, W - 1)[..., None], 1), init_logq)
        fresh = (s > m[:, None] + W) & (s <= m2[:, None] + W) & active[:, None]
        seq = jnp.where(fresh, jnp.take_along_axis(
            uniform(k_init), jnp.clip(s - m2[:, None] - 1, 0, W - 1), 1), seq)
        return cache, seq, logq, decided, forwards + active, it + 1

    carry = (cache, seq, init_q, decided, jnp.zeros(B, jnp.int32), jnp.int32(0))
    _, seq, _, _, forwards, _ = jax.lax.while_loop(
        lambda c: jnp.any(c[3] <= steps), body, carry)
    return seq[:, 1:steps + 1], forwards


def _layout(tokens, lengths):
    """Left-padded prompts -> (positions, segment ids), as decode._prompt_layout."""
    P = tokens.shape[1]
    pad = P - lengths[:, None]
    cols = jnp.arange(P)[None, :]
    return jnp.maximum(cols - pad, 0).astype(jnp.int32), (cols >= pad).astype(jnp.int32)
