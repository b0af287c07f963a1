"""AdamW with linear warm-up, linear decay to a fraction of the peak, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from cm3leon_jax.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay_steps = cfg.decay_steps or total_steps
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
         optax.linear_schedule(cfg.lr, cfg.lr * cfg.final_lr_ratio,
                               max(decay_steps - cfg.warmup_steps, 1))],
        [cfg.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices and embeddings, not on the QK-norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) in ("q_scale", "k_scale") for k in path),
        params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_decay_mask),
    )
