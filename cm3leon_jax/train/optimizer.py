"""AdamW with a learning-rate schedule (linear warm-up, then linear, cosine or
warmup-stable-decay down to a fraction of the peak), global-norm clipping."""

from __future__ import annotations

import jax
import optax

from cm3leon_jax.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then, to `final_lr_ratio` x `lr`
    at the schedule length L (`decay_steps`, else `total_steps`): `linear` and `cosine`
    decay over steps warmup..L; `wsd` holds `lr` and decays linearly over the last
    `decay_fraction` of L. Past L the rate stays at its end value."""
    length = cfg.decay_steps or total_steps
    cfg.check_length(length)  # train.steps is another section's key: refuse here too
    end = cfg.lr * cfg.final_lr_ratio
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.schedule == "wsd":
        decay = cfg.wsd_decay_steps(length)
        return optax.join_schedules(
            [warmup, optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay)],
            [cfg.warmup_steps, length - decay])
    span = max(length - cfg.warmup_steps, 1)
    decay = (optax.cosine_decay_schedule(cfg.lr, span, alpha=cfg.final_lr_ratio)
             if cfg.schedule == "cosine" else optax.linear_schedule(cfg.lr, end, span))
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


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
