"""`cm3leon score`: per-token log-probabilities of given token sequences.

For rows of T tokens, out[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1]), the basis of
perplexity evaluation and of reranking candidates by perplexity (RA-CM3). Rows are plain
sequences (positions 0..T-1, no packing), scored in batches whose rows are split over the
mesh's batch axes while the parameters stay sharded. The softmax runs over the whole
(padded) vocabulary in float32, exactly as the training loss does. The tokens and the
output may be on cloud storage (storage.py).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train.weights import Weights


def check_tokens(tokens: np.ndarray, cfg: Config, where: str) -> None:
    """Refuse what cannot be scored, naming the first offending entry."""
    if tokens.ndim != 2:
        raise ConfigError(f"{where}: expected [B, T] token ids, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"{where}: expected integer token ids, got {tokens.dtype}")
    B, T = tokens.shape
    if B < 1 or T < 2:
        raise ConfigError(f"{where}: need at least 1 row of at least 2 tokens, got {tokens.shape}")
    if T > cfg.model.max_seq_len:
        raise ConfigError(f"{where}: rows of {T} tokens exceed model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    used = cfg.vocab.build().used_size
    bad = np.argwhere((tokens < 0) | (tokens >= used))
    if len(bad):
        b, t = bad[0]
        raise ConfigError(f"{where}: token [{b}, {t}] = {tokens[b, t]} is outside the "
                          f"vocabulary [0, {used})")


def make_score_fn(weights: Weights):
    """Jitted (params, tokens [b, T]) -> log-probs [b, T-1] float32, sharded by batch."""
    mdef, mesh = weights.mdef, weights.mesh

    def score(params, tokens):
        return mdef.bind(params).token_logprobs(tokens)

    return jax.jit(score, in_shardings=(mdef.param_shardings(mesh),
                                        mesh_lib.batch_sharding(mesh)),
                   out_shardings=mesh_lib.batch_sharding(mesh))


def batch_rows(batch_size: int, weights: Weights) -> int:
    """Rows per step: `batch_size` rounded up to a multiple of the data-parallel size."""
    dp = weights.mesh.shape["data"] * weights.mesh.shape["fsdp"]
    return -(-batch_size // dp) * dp


def score_tokens(weights: Weights, tokens: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """[B, T] token ids -> [B, T-1] float32 log-probabilities."""
    check_tokens(tokens, weights.cfg, "tokens")
    tokens = tokens.astype(np.int32)
    rows = batch_rows(batch_size, weights)
    fn = make_score_fn(weights)
    sharding = mesh_lib.batch_sharding(weights.mesh)
    out = np.empty((tokens.shape[0], tokens.shape[1] - 1), np.float32)
    lead = jax.process_index() == 0
    with jax.set_mesh(weights.mesh):
        for lo in tqdm(range(0, len(tokens), rows), desc="score", unit="batch",
                       disable=not lead, dynamic_ncols=True):
            chunk = tokens[lo:lo + rows]
            n = len(chunk)
            if n < rows:  # pad the last batch with copies of its first row; dropped below
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], rows - n, axis=0)])
            batch = jax.make_array_from_callback(chunk.shape, sharding, lambda i, c=chunk: c[i])
            result = fn(weights.params, batch)
            out[lo:lo + n] = _to_host(result)[:n]
    return out


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def load_tokens(path: storage.PathLike) -> np.ndarray:
    path = storage.path(path)
    if not path.is_file():
        raise ConfigError(f"--tokens {path} does not exist")
    try:
        with path.open("rb") as f:
            return np.load(f, allow_pickle=False)
    except ValueError as e:
        raise ConfigError(f"--tokens {path}: not a .npy array ({e})") from None


def save_scores(logp: np.ndarray, out_path: storage.PathLike) -> dict:
    """Write OUT.npy (process 0); returns a summary (mean log-prob, perplexity per token)."""
    out_path = storage.path(out_path)
    if out_path.suffix != ".npy":  # as np.save names it
        out_path = out_path.with_name(out_path.name + ".npy")
    if jax.process_index() == 0:
        with out_path.open("wb") as f:
            np.save(f, logp)
    mean = float(logp.mean())
    return {"rows": int(logp.shape[0]), "tokens": int(logp.size), "mean_logprob": mean,
            "perplexity": float(np.exp(-mean)), "out": str(out_path)}
