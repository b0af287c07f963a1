"""The loss and the jitted train step: the one function `train`, the benchmark and the
ahead-of-time compiler all run.

A batch is a dict of [B, T] arrays: `inputs`, `targets` (int32 token ids), `positions`,
`segment_ids` (int32; packed rows, 0 = padding) and `weights` (float32 loss weight per
target; 0 on padding).

A step whose loss or gradient norm is not finite leaves parameters and optimizer state as
they were (metric `skipped` = 1); the step counter still advances, because its batch was
consumed. Finite steps compute exactly what they would without the check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm3leon_jax.config import Config
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train.optimizer import lr_schedule
from cm3leon_jax.train.state import ModelDef, TrainState
from cm3leon_jax.vocab import Vocab

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
SUM_KEYS = ("ce", "z", "text_ce", "text_w", "image_ce", "image_w", "w")


def _token_sums(model, hidden, targets, weights, vocab: Vocab) -> dict:
    logits = model.logits(hidden)
    logz = jax.nn.logsumexp(logits, axis=-1)
    ce = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    text = vocab.is_text(targets) * weights
    image = vocab.is_image(targets) * weights
    return {"ce": (ce * weights).sum(), "z": (jnp.square(logz) * weights).sum(),
            "text_ce": (ce * text).sum(), "text_w": text.sum(),
            "image_ce": (ce * image).sum(), "image_w": image.sum(), "w": weights.sum()}


def loss_sums(model, batch: dict, vocab: Vocab, chunk: int = 0) -> dict:
    """Weighted sums of cross-entropy, log^2 Z and token weights, split by modality.

    With `chunk`, logits are made `chunk` tokens at a time inside a rematerialised scan, so
    only one chunk of [B, chunk, V] float32 logits is ever alive.
    """
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    targets, weights = batch["targets"], batch["weights"]
    T = targets.shape[1]
    if not chunk or chunk >= T:
        return _token_sums(model, hidden, targets, weights, vocab)
    n = T // chunk
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(carry, xs):
        h, t, w = xs
        sums = _token_sums(model, h, t, w, vocab)
        return jax.tree.map(jnp.add, carry, sums), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    sums, _ = jax.lax.scan(one, zeros, (split(hidden), split(targets), split(weights)))
    return sums


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation):
    """(state, batch) -> (state, metrics); pure, for jax.jit."""
    vocab = cfg.vocab.build()
    accum = cfg.train.grad_accum
    z_coef = cfg.model.z_loss
    schedule = lr_schedule(cfg.optimizer, cfg.train.steps)
    grad_specs = jax.tree.map(mesh_lib.spec, mdef.param_axes, is_leaf=mesh_lib.is_axes)
    nan_steps = cfg.fault.debug_nan_steps

    def loss_fn(params, batch, total_w):
        sums = loss_sums(mdef.bind(params), batch, vocab, cfg.model.logits_chunk)
        return (sums["ce"] + z_coef * sums["z"]) / total_w, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict):
        total_w = jnp.maximum(batch["weights"].sum(), 1.0)
        if accum == 1:
            (_, sums), grads = grad_fn(state.params, batch, total_w)
        else:
            # Row i of micro-batch j is row i*accum + j: every device keeps a share of each
            # micro-batch, so no micro-batch lands on a subset of the devices.
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
                batch)

            def accumulate(carry, mb):
                (_, sums), grads = grad_fn(state.params, mb, total_w)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro)
        grads = jax.lax.with_sharding_constraint(grads, grad_specs)
        if nan_steps:  # fault.debug_nan_steps: poison this step's gradients
            hit = jnp.isin(state.step + 1, jnp.asarray(nan_steps, jnp.int32))
            grads = jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(sums["ce"]) & jnp.isfinite(sums["z"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {
            "loss": sums["ce"] / total_w,
            "z_loss": sums["z"] / total_w,
            "text_loss": sums["text_ce"] / jnp.maximum(sums["text_w"], 1.0),
            "image_loss": sums["image_ce"] / jnp.maximum(sums["image_w"], 1.0),
            "text_tokens": sums["text_w"],
            "image_tokens": sums["image_w"],
            "real_tokens": (batch["segment_ids"] > 0).sum(),  # not padding
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "skipped": 1.0 - finite.astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def batch_shardings(mesh: Mesh) -> dict:
    return {k: mesh_lib.batch_sharding(mesh) for k in BATCH_KEYS}


def jit_train_step(cfg: Config, mdef: ModelDef, tx, shardings: TrainState, mesh: Mesh):
    """The jitted step with explicit layouts; the state buffers are donated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(make_train_step(cfg, mdef, tx),
                   in_shardings=(shardings, batch_shardings(mesh)),
                   out_shardings=(shardings, replicated),
                   donate_argnums=0)


def abstract_batch(cfg: Config, mesh: Mesh, batch_size: int | None = None) -> dict:
    shape = (batch_size or cfg.train.batch_size, cfg.data.seq_len)
    sh = mesh_lib.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32,
                                    sharding=sh) for k in BATCH_KEYS}
