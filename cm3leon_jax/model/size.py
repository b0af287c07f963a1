"""Parameter counts and FLOPs per token, from the config alone (no arrays built)."""

from __future__ import annotations

from cm3leon_jax.config import ModelConfig


def param_counts(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + 2 * d * cfg.d_ff  # qkv + attention out + the two FFN matrices
    if cfg.qk_norm:
        per_layer += 2 * d  # per-head scales on q and k
    counts = {
        "embedding": vocab_size * d,
        "positions": cfg.max_seq_len * d,
        "layers": L * per_layer,
        "lm_head": 0 if cfg.tie_embeddings else d * vocab_size,
    }
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention.

    Matmul parameters are the layer matrices and the output projection (the embedding
    lookup and the position table do no matmul). Attention scores and the weighted sum cost
    4*T*d per token and layer forward over the full T x T matrix; causal masking halves
    that (MaxText's accounting since its PR #1988), and backward doubles forward: 6*L*T*d.
    """
    d, L = cfg.d_model, cfg.n_layers
    matmul = L * (4 * d * d + 2 * d * cfg.d_ff) + d * vocab_size
    return 6.0 * matmul + 6.0 * L * seq_len * d
