"""Training of the image tokenizer (`cm3leon tokenizer train-image`).

Loss: L1 or L2 reconstruction (+ `perceptual_weight` x LPIPS when the published VGG16 and
lpips weights are given) + codebook_weight x (codebook + beta x commitment), plus an
optional patch-GAN as taming/LlamaGen (on from `disc_start`): hinge or non-saturating
losses, the generator term weighted by `disc_weight`, times taming's adaptive weight when
`adaptive_weight` is set (its reconstruction gradient includes the LPIPS term, as taming's
`nll_loss`), and LlamaGen's LeCam regulariser on the discriminator when `lecam_weight` > 0.
Without LPIPS weights there is no perceptual term: a random VGG's feature distance is not
perceptual, and VGG16 would make the demo's step about five times as expensive.
Dead-code restarts keep the codebook in use: every `restart_every` steps (not after the
last step, so the evaluated codebook is the trained one), codes no batch picked in that
window are re-seeded from encoder outputs of the current batch.
metrics.jsonl rows carry codebook usage and perplexity of the codes picked since the
previous row; the summary those of the eval images' codes. The core,
`train_image_tokenizer`, takes uint8 images as a numpy array, so it does not depend on
where they come from. Its work directory may be on cloud storage: the run writes into a
local one that is uploaded when it is done (storage.staged_dir).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, VQGANConfig, VQGANTrainConfig
from cm3leon_jax.model.patchgan import PatchGAN
from cm3leon_jax.perception import lpips as lpips_lib
from cm3leon_jax.shapes.world import check_world, render_shapes, shapes_scene
from cm3leon_jax.tokenizers.image import (ImageTokenizer, abstract_params, graphdef, init_like,
                                          init_params, to_float)

TOKENIZER_DIR = "image_tokenizer"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of the mean squared error over all pixels of two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def save_comparison(originals: np.ndarray, reconstructions: np.ndarray, path: Path) -> None:
    """PNG: originals in the top row, reconstructions below, enlarged to >= 64 px each."""
    scale = max(1, 64 // originals.shape[1])
    rows = [np.concatenate(list(x), axis=1) for x in (originals, reconstructions)]
    grid = np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(grid).save(path)


def learning_rate(t: VQGANTrainConfig):
    """`lr` throughout, or cosine-decayed from `lr` at step 0 to 0 at `steps` (for runs long
    enough to plateau; the demo's is not, and decays worse: bench/RESULTS.md)."""
    if t.schedule == "cosine":
        return optax.cosine_decay_schedule(t.lr, t.steps)
    return t.lr


def _optimizer(t: VQGANTrainConfig):
    return optax.adam(learning_rate(t), t.b1, t.b2)


def _discriminator(t: VQGANTrainConfig, rngs: nnx.Rngs) -> PatchGAN:
    return PatchGAN(t.disc_channels, t.disc_layers, rngs=rngs)


LECAM_DECAY = 0.999  # LlamaGen's lecam_ema_decay for the EMAs of the logits


def gen_loss(kind: str, fake: jax.Array) -> jax.Array:
    """The generator's GAN loss of discriminator logits on reconstructions: hinge -E[D(G)],
    non_saturating E[softplus(-D(G))] = -E[log sigmoid(D(G))]."""
    return -jnp.mean(fake) if kind == "hinge" else jnp.mean(jax.nn.softplus(-fake))


def disc_loss(kind: str, real: jax.Array, fake: jax.Array) -> jax.Array:
    """The discriminator's loss: hinge E[relu(1 - D(x))] + E[relu(1 + D(G))], non_saturating
    E[softplus(-D(x))] + E[softplus(D(G))] (logistic). Not halved as in taming/LlamaGen:
    Adam's steps do not depend on the loss scale."""
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def lecam_loss(real: jax.Array, fake: jax.Array, ema_real: jax.Array,
               ema_fake: jax.Array) -> jax.Array:
    """LeCam regulariser (Tseng et al. 2021; LlamaGen's `lecam_reg`): E[relu(D(x) - ema_fake)^2]
    + E[relu(ema_real - D(G))^2], with EMAs of the mean logits; keeps D's outputs from
    drifting apart when it wins easily (small data)."""
    return (jnp.mean(jax.nn.relu(real - ema_fake) ** 2)
            + jnp.mean(jax.nn.relu(ema_real - fake) ** 2))


def adaptive_weight(rec_of_last, gen_of_last, last: jax.Array) -> jax.Array:
    """taming's `calculate_adaptive_weight` before its disc_weight factor: ||grad rec|| /
    (||grad gen|| + 1e-4), both gradients with respect to the decoder's last-layer weight
    `last` (losses given as functions of it), clipped to [0, 1e4], without gradient. It
    balances the GAN term against reconstruction whatever their scales."""
    rec = jnp.sqrt(jnp.sum(jax.grad(rec_of_last)(last) ** 2))
    gen = jnp.sqrt(jnp.sum(jax.grad(gen_of_last)(last) ** 2))
    return jax.lax.stop_gradient(jnp.clip(rec / (gen + 1e-4), 0.0, 1e4))


def loss_functions(cfg: VQGANConfig, t: VQGANTrainConfig, gan: bool):
    """(generator_loss(params, dparams, x, lpips_params) -> (loss, (metrics, codes, z, recon)),
    discriminator_loss(dparams, real, fake, ema) -> (loss, (metrics, new ema))).

    x, real, fake: float images in [-1, 1]; ema: [2] EMAs of the mean real and fake logits
    (LeCam's, carried between steps); lpips_params: `LPIPS.params` when
    `t.perceptual_weight` > 0 (an argument, so its weights are not compiled in), else
    ignored. metrics["d_weight"] is the GAN term's weight (disc_weight x the adaptive weight)
    when `t.adaptive_weight` is set; metrics["perceptual"] the mean LPIPS.
    """
    gdef = graphdef(cfg)
    dgdef = nnx.graphdef(nnx.eval_shape(lambda: _discriminator(t, nnx.Rngs(0)))) if gan else None

    def rec_loss(recon, x, lpips_params):
        """(pixel + perceptual_weight x mean LPIPS, {its two terms} when LPIPS is on)."""
        err = recon - x
        pixel = jnp.mean(jnp.abs(err)) if t.recon_loss == "l1" else jnp.mean(err ** 2)
        if not t.perceptual_weight:
            return pixel, {}
        perceptual = jnp.mean(lpips_lib.distance(lpips_params, recon, x))
        return (pixel + t.perceptual_weight * perceptual,
                {"pixel": pixel, "perceptual": perceptual})

    def generator_loss(params, dparams, x, lpips_params):
        model = nnx.merge(gdef, params)
        zq, codes, z, cb, commit = model.quantized(x)
        h = model.decoder.features(model.decoder_input(zq))
        recon = model.decoder.conv_out(h)
        rec, terms = rec_loss(recon, x, lpips_params)
        loss = rec + t.codebook_weight * (cb + t.beta * commit)
        mse = jnp.mean((jnp.clip(recon, -1, 1) - x) ** 2) / 4  # on the [0, 1] scale
        metrics = {"rec": rec, "codebook": cb, "commit": commit, **terms,
                   "psnr": -10 * jnp.log10(jnp.maximum(mse, 1e-10))}
        if gan:
            disc = nnx.merge(dgdef, dparams)
            g = gen_loss(t.disc_loss, disc(recon))
            weight = t.disc_weight
            if t.adaptive_weight:
                head_def = nnx.graphdef(model.decoder.conv_out)
                head = jax.lax.stop_gradient(params["decoder"]["conv_out"])
                hs = jax.lax.stop_gradient(h)

                def out(kernel):  # the reconstruction as a function of the last layer's weight
                    return nnx.merge(head_def, {**head, "kernel": kernel})(hs)

                weight = weight * adaptive_weight(lambda k: rec_loss(out(k), x, lpips_params)[0],
                                                  lambda k: gen_loss(t.disc_loss, disc(out(k))),
                                                  head["kernel"])
                metrics["d_weight"] = weight
            loss = loss + weight * g
            metrics["gen"] = g
        metrics["loss"] = loss
        return loss, (metrics, codes, z, recon)

    def discriminator_loss(dparams, real, fake, ema):
        d = nnx.merge(dgdef, dparams)
        logits_real, logits_fake = d(real), d(fake)
        adv = disc_loss(t.disc_loss, logits_real, logits_fake)
        metrics, loss = {"disc": adv}, adv
        if t.lecam_weight:
            lecam = lecam_loss(logits_real, logits_fake, ema[0], ema[1])
            loss = loss + t.lecam_weight * lecam
            metrics["lecam"] = lecam
            means = jax.lax.stop_gradient(jnp.stack([jnp.mean(logits_real),
                                                     jnp.mean(logits_fake)]))
            ema = LECAM_DECAY * ema + (1 - LECAM_DECAY) * means
        return loss, (metrics, ema)

    return generator_loss, discriminator_loss


@functools.lru_cache(maxsize=None)
def _make_step(cfg: VQGANConfig, t: VQGANTrainConfig, gan: bool):
    """The jitted train step; cached so runs with equal settings compile once.

    Call it with `_step_key(t)` so fields that do not enter the step share the cache.
    """
    opt = _optimizer(t)
    generator_loss, discriminator_loss = loss_functions(cfg, t, gan)

    def step(params, opt_state, dparams, dopt_state, ema, images, lpips_params):
        x = to_float(images)
        grads, (metrics, codes, z, recon) = jax.grad(generator_loss, has_aux=True)(
            params, dparams, x, lpips_params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if gan:
            dgrads, (dmetrics, ema) = jax.grad(discriminator_loss, has_aux=True)(
                dparams, x, jax.lax.stop_gradient(recon), ema)
            dupdates, dopt_state = opt.update(dgrads, dopt_state, dparams)
            dparams = optax.apply_updates(dparams, dupdates)
            metrics.update(dmetrics)
        return params, opt_state, dparams, dopt_state, ema, metrics, codes, z

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def _step_key(t: VQGANTrainConfig) -> VQGANTrainConfig:
    """`t` with the fields the step does not read set to defaults."""
    return VQGANTrainConfig(lr=t.lr, schedule=t.schedule,
                            steps=t.steps if t.schedule == "cosine" else VQGANTrainConfig.steps,
                            b1=t.b1, b2=t.b2, recon_loss=t.recon_loss, beta=t.beta,
                            codebook_weight=t.codebook_weight, disc_weight=t.disc_weight,
                            disc_loss=t.disc_loss, adaptive_weight=t.adaptive_weight,
                            lecam_weight=t.lecam_weight, disc_channels=t.disc_channels,
                            disc_layers=t.disc_layers, perceptual_weight=t.perceptual_weight)


def usage_and_perplexity(counts: np.ndarray) -> tuple[float, float]:
    """(fraction of codes used, exp of the entropy of the code frequencies) of code counts:
    perplexity is the number of equally used codes with the same entropy, so it also sees
    codes that are used, but rarely."""
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).mean()), float(np.exp(-np.sum(p * np.log(p))))


def restart_dead_codes(codebook: np.ndarray, counts: np.ndarray, z: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Codes with count 0 replaced by randomly chosen encoder vectors z [N, D] (+ tiny noise)."""
    dead = np.flatnonzero(counts == 0)
    if len(dead) == 0:
        return codebook, 0
    pick = rng.choice(len(z), size=len(dead), replace=len(dead) > len(z))
    noise = rng.normal(0.0, 1e-3 * (z.std() + 1e-8), (len(dead), z.shape[1]))
    codebook = codebook.copy()
    codebook[dead] = z[pick] + noise
    return codebook, len(dead)


def _check_images(images: np.ndarray, resolution: int, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (resolution,
                                                                          resolution, 3):
        raise ValueError(f"{what}: expected uint8 [N, {resolution}, {resolution}, 3], got "
                         f"{images.dtype} {images.shape}")


def check_perceptual(cfg: VQGANConfig, t: VQGANTrainConfig) -> None:
    """With `perceptual_weight`: images LPIPS can take and both weight files present —
    checked by every caller before its expensive work (rendering, reading, fitting)."""
    if not t.perceptual_weight:
        return
    if cfg.resolution < lpips_lib.MIN_SIZE:
        raise ValueError(f"vqgan_train.perceptual_weight: LPIPS needs images of at least "
                         f"{lpips_lib.MIN_SIZE}x{lpips_lib.MIN_SIZE}, vqgan.resolution is "
                         f"{cfg.resolution}")
    for key in ("lpips_vgg", "lpips_heads"):
        if not storage.path(getattr(t, key)).is_file():
            raise FileNotFoundError(f"vqgan_train.{key}={getattr(t, key)}: no such file")


def train_image_tokenizer(cfg: VQGANConfig, t: VQGANTrainConfig, images: np.ndarray,
                          workdir: storage.PathLike, eval_images: np.ndarray,
                          progress: bool = True) -> tuple[ImageTokenizer, dict]:
    """Train on `images` (uint8 [N, R, R, 3]); save the tokenizer, metrics and a PNG.

    Returns the tokenizer and a summary: PSNR, codebook usage and perplexity on
    `eval_images` — held-out images, never trained on: numbers on training images would
    flatter a tokenizer that memorises —, time, restarted codes.
    """
    _check_images(images, cfg.resolution, "training images")
    if len(images) < t.batch_size:
        raise ValueError(f"{len(images)} training images are fewer than "
                         f"vqgan_train.batch_size={t.batch_size}")
    _check_images(eval_images, cfg.resolution, "held-out eval images")
    check_perceptual(cfg, t)
    lpips_params = ({} if not t.perceptual_weight
                    else lpips_lib.load_lpips(t.lpips_vgg, t.lpips_heads).params)
    with storage.staged_dir(workdir) as local:
        return _train(cfg, t, images, local, eval_images, lpips_params, progress)


def _train(cfg: VQGANConfig, t: VQGANTrainConfig, images: np.ndarray, workdir: Path,
           eval_images: np.ndarray, lpips_params: dict,
           progress: bool) -> tuple[ImageTokenizer, dict]:
    """`train_image_tokenizer` into the local directory `workdir`."""
    rng = np.random.default_rng(t.seed)

    params = init_params(cfg, t.seed)
    opt_state = _optimizer(t).init(params)
    gan = t.disc_weight > 0
    dparams, dopt_state, ema = {}, {}, jnp.zeros(2, jnp.float32)
    if gan:
        dparams = init_like(abstract_params(lambda rngs: _discriminator(t, rngs)), t.seed + 1)
        dopt_state = _optimizer(t).init(dparams)
    key, lr = _step_key(t), learning_rate(t)
    steps = {g: _make_step(cfg, key, g) for g in {False, gan}}

    counts = np.zeros(cfg.codebook_size, np.int64)  # since the last restart
    window = np.zeros(cfg.codebook_size, np.int64)  # since the last metrics row
    order, pos = rng.permutation(len(images)), 0
    history, restarted = [], 0
    t0 = time.perf_counter()
    bar = tqdm(range(t.steps), desc="train-image", disable=not progress)
    with open(workdir / "metrics.jsonl", "w") as log:
        for step in bar:
            if pos + t.batch_size > len(order):
                order, pos = rng.permutation(len(images)), 0
            batch = images[order[pos:pos + t.batch_size]]
            pos += t.batch_size
            use_gan = gan and step >= t.disc_start
            params, opt_state, dparams, dopt_state, ema, metrics, codes, z = steps[use_gan](
                params, opt_state, dparams, dopt_state, ema, batch, lpips_params)
            picked = np.bincount(np.asarray(codes).ravel(), minlength=cfg.codebook_size)
            counts += picked
            window += picked
            if t.restart_every and (step + 1) % t.restart_every == 0 and step + 1 < t.steps:
                book, n = restart_dead_codes(np.asarray(params["codebook"]), counts,
                                             np.asarray(z).reshape(-1, cfg.code_dim), rng)
                if n:
                    params["codebook"] = jnp.asarray(book, jnp.float32)
                restarted += n
                counts[:] = 0
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                usage, perplexity = usage_and_perplexity(window)
                window[:] = 0
                row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()},
                       "lr": float(lr(step)) if callable(lr) else lr,
                       "usage": usage, "perplexity": perplexity, "restarted": restarted}
                history.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.2f}",
                                usage=f"{row['usage']:.2f}")
    train_seconds = time.perf_counter() - t0

    tok = ImageTokenizer(cfg, params, batch_size=t.batch_size)
    codes = tok.encode(eval_images)
    recon = tok.decode(codes)
    summary = {
        "steps": t.steps, "train_images": len(images), "eval_images": len(eval_images),
        "psnr": psnr(eval_images, recon),
        "codebook_usage": len(np.unique(codes)) / cfg.codebook_size,
        "codebook_perplexity": usage_and_perplexity(
            np.bincount(codes.ravel(), minlength=cfg.codebook_size))[1],
        "codes_restarted": restarted, "train_seconds": round(train_seconds, 1),
        "final_batch_psnr": history[-1]["psnr"] if history else None,
    }
    tok.save(workdir / TOKENIZER_DIR)
    save_comparison(eval_images[:8], recon[:8], workdir / "reconstructions.png")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return tok, summary


def shapes_images(count: int, resolution: int, seed: int, max_objects: int) -> np.ndarray:
    """uint8 [count, R, R, 3]: scenes 0..count-1 of the built-in shapes world."""
    check_world(resolution, max_objects)
    return np.stack([render_shapes(shapes_scene(i, seed, resolution, max_objects), resolution)[0]
                     for i in tqdm(range(count), desc="render shapes", leave=False)])


def train_from_config(cfg: Config, workdir: storage.PathLike,
                      progress: bool = True) -> tuple[ImageTokenizer, dict]:
    """`cm3leon tokenizer train-image`: `vqgan_train.images` shapes scenes (seed
    `vqgan_train.seed`), evaluated on `vqgan_train.eval_images` others (seed + 1)."""
    v, t = cfg.vqgan, cfg.vqgan_train
    check_perceptual(v, t)
    train = shapes_images(t.images, v.resolution, t.seed, cfg.source.max_objects)
    held_out = shapes_images(t.eval_images, v.resolution, t.seed + 1, cfg.source.max_objects)
    return train_image_tokenizer(v, t, train, workdir, held_out, progress)
