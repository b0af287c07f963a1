"""Contrastive training of the built-in dual encoder, and loading it back for embedding.

Batches of B prepared pairs (documents with text tokens and pixels) are drawn in a
per-epoch permutation fixed by `retrieval.seed`; the loss is symmetric InfoNCE over the
B x B text–image similarities at a fixed temperature (CLIP). Half the texts are seen with
`train_text_dropout` of their tokens dropped, like the queries `neighbors` builds. The step is jitted over the
project's mesh: parameters laid out by the logical-axis rule table, the batch split over
(`data`, `fsdp`). The result is `<retrieval dir>/encoder/{params.npz, encoder.json}`
(local or on cloud storage, storage.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError, RetrievalConfig
from cm3leon_jax.data import records
from cm3leon_jax.layout import DataDir
from cm3leon_jax.model.encoder import MAX_TEXT, DualEncoder, EncoderSpec, new_encoder
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.retrieval.embed import drop_tokens
from cm3leon_jax.vocab import Vocab

PARAMS, INFO = "params.npz", "encoder.json"  # in <retrieval dir>/encoder/


def text_tokens(doc: dict, vocab: Vocab) -> np.ndarray:
    """A document's text ids as text-tower tokens 1..text_size (0 is padding)."""
    ids = np.asarray(doc["text"], np.int64)
    ids = ids[vocab.is_text(ids)]
    return (ids - vocab.text_offset + 1).astype(np.int32)[:MAX_TEXT]


def pad_tokens(token_lists: list[np.ndarray], rows: int | None = None) -> np.ndarray:
    """Right-padded int32 [rows, T], T a multiple of 16 (few shapes, few compilations)."""
    T = min(MAX_TEXT, -(-max(max(len(t) for t in token_lists), 1) // 16) * 16)
    out = np.zeros((rows or len(token_lists), T), np.int32)
    for r, t in enumerate(token_lists):
        out[r, :len(t)] = t[:T]
    return out


def pair_batches(data_dir: storage.PathLike, vocab: Vocab, batch: int, seed: int,
                 text_dropout: float = 0.0):
    """Endless (tokens [B, T], pixels [B, H, W, 3]) batches of pairs, fixed by seed.

    With `text_dropout`, half of the texts (by a coin per pair and epoch) lose that fraction
    of their tokens, as retrieval queries do, so the text tower learns to embed them too.
    """
    source = records.open_documents(data_dir)
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(source))
        coins = rng.random(len(source)) < 0.5
        toks, pix, found = [], [], 0
        for i in order:
            doc = records.decode_document(source[int(i)])
            t = text_tokens(doc, vocab)
            if not len(t) or doc["pixels"] is None:
                continue
            if text_dropout and coins[i]:
                t = drop_tokens(t, text_dropout, seed + epoch + 1, int(i))
            found += 1
            if pix and doc["pixels"].shape != pix[0].shape:
                raise ValueError(f"{data_dir}: document {int(i)} has pixels "
                                 f"{doc['pixels'].shape}, others {pix[0].shape}")
            toks.append(t), pix.append(doc["pixels"])
            if len(toks) == batch:
                yield pad_tokens(toks), np.stack(pix)
                toks, pix = [], []
        if found < batch:
            raise ValueError(f"{data_dir}: {found} documents with both text and pixels, "
                             f"fewer than retrieval.train_batch_size={batch}")
        epoch += 1


def _axes(model: DualEncoder) -> dict:
    state = nnx.state(model)
    axes = jax.tree.map(lambda v: v.get_metadata()["out_sharding"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def contrastive_loss(model: DualEncoder, tokens, pixels, temperature: float):
    t = model.embed_texts(tokens)
    i = model.embed_images(pixels)
    logits = (t @ i.T) / temperature
    labels = jnp.arange(len(logits))
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    accuracy = (jnp.argmax(logits, 1) == labels).mean()
    return loss, accuracy


def train_encoder(cfg: Config, data_dir: storage.PathLike, out_dir: storage.PathLike) -> dict:
    """Train on `data_dir`'s pairs; writes params and info under `out_dir`; returns info."""
    r = cfg.retrieval
    vocab_path = DataDir(data_dir).vocab
    if not vocab_path.exists():
        raise FileNotFoundError(f"{vocab_path}: missing (a prepared directory has vocab.json)")
    vocab = Vocab.load(vocab_path)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if r.train_batch_size % dp:
        raise ConfigError(f"retrieval.train_batch_size={r.train_batch_size} is not divisible "
                          f"by the data-parallel size mesh.data x mesh.fsdp = {dp}")
    spec = EncoderSpec(vocab.text_size, r.embed_dim, r.width, r.text_layers)
    abstract = nnx.eval_shape(lambda: new_encoder(spec, r.seed))
    graphdef, _ = nnx.split(abstract)
    param_sh = mesh_lib.shardings(_axes(abstract), mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, r.train_lr, max(1, r.train_steps // 10),
                                           r.train_steps), weight_decay=1e-4))

    def init():
        params = nnx.to_pure_dict(nnx.state(new_encoder(spec, r.seed)))
        return params, tx.init(params)

    with jax.set_mesh(mesh):
        abstract_opt = jax.eval_shape(init)[1]
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                       transform_non_params=lambda _: replicated)
        params, opt_state = jax.jit(init, out_shardings=(param_sh, opt_sh))()

        def step(params, opt_state, tokens, pixels):
            def loss_fn(p):
                return contrastive_loss(nnx.merge(graphdef, p), tokens, pixels, r.temperature)

            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, acc

        step = jax.jit(step, in_shardings=(param_sh, opt_sh, mesh_lib.batch_sharding(mesh, 2),
                                           mesh_lib.batch_sharding(mesh, 4)),
                       out_shardings=(param_sh, opt_sh, replicated, replicated),
                       donate_argnums=(0, 1))
        batches = pair_batches(data_dir, vocab, r.train_batch_size, r.seed,
                               r.train_text_dropout)
        t0 = time.perf_counter()
        losses, accs = [], []
        bar = tqdm(range(r.train_steps), desc="train-encoder", unit="step")
        for _ in bar:
            tokens, pixels = next(batches)
            params, opt_state, loss, acc = step(params, opt_state, tokens, pixels)
            losses.append(float(loss)), accs.append(float(acc))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.2f}")
        seconds = time.perf_counter() - t0
    last = max(1, r.train_steps // 10)
    info = {"spec": dataclasses.asdict(spec), "vocab": vocab.to_json(),
            "data_dir": str(data_dir), "steps": r.train_steps,
            "batch_size": r.train_batch_size, "temperature": r.temperature,
            "text_dropout": r.train_text_dropout,
            "mesh": dict(mesh.shape), "seconds": round(seconds, 1),
            "loss_first": round(losses[0], 4),
            "loss_last": round(float(np.mean(losses[-last:])), 4),
            "batch_accuracy_last": round(float(np.mean(accs[-last:])), 4)}
    save_encoder(out_dir, jax.device_get(params), info)
    return info


def save_encoder(out_dir: storage.PathLike, params: dict, info: dict) -> None:
    out_dir = storage.path(out_dir)
    flat = {jax.tree_util.keystr(path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    storage.save_npz(out_dir / PARAMS, **flat)
    (out_dir / INFO).write_text(json.dumps(info, indent=2) + "\n")


@partial(jax.jit, static_argnums=0)
def _embed_texts(graphdef, params, tokens):
    return nnx.merge(graphdef, params).embed_texts(tokens)


@partial(jax.jit, static_argnums=0)
def _embed_images(graphdef, params, pixels):
    return nnx.merge(graphdef, params).embed_images(pixels)


class BuiltinEncoder:
    """The trained dual encoder behind the retrieval encoder interface."""

    has_text, has_image = True, True

    def __init__(self, spec: EncoderSpec, params: dict, vocab: Vocab, batch: int,
                 fingerprint: str = ""):
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: new_encoder(spec, 0)))
        self.params, self.vocab, self.batch, self.dim = params, vocab, batch, spec.embed_dim
        self.fingerprint = fingerprint  # which weights: cached vectors must match it

    def text_tokens(self, doc: dict) -> np.ndarray:
        return text_tokens(doc, self.vocab)

    def embed_texts(self, token_lists: list[np.ndarray]) -> np.ndarray:
        out = []
        for s in range(0, len(token_lists), self.batch):
            part = token_lists[s:s + self.batch]
            out.append(np.asarray(_embed_texts(self.graphdef, self.params, pad_tokens(part, self.batch)))[:len(part)])
        return np.concatenate(out)

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(pixels), self.batch):
            part = pixels[s:s + self.batch]
            full = np.zeros((self.batch, *part.shape[1:]), np.uint8)
            full[:len(part)] = part
            out.append(np.asarray(_embed_images(self.graphdef, self.params, full))[:len(part)])
        return np.concatenate(out)


def load_encoder(enc_dir: storage.PathLike, batch: int) -> BuiltinEncoder:
    enc_dir = storage.path(enc_dir)
    if not (enc_dir / INFO).exists():
        raise FileNotFoundError(f"{enc_dir}: no trained encoder (run `cm3leon retrieval "
                                f"train-encoder` first, or set retrieval.encoder)")
    info = json.loads((enc_dir / INFO).read_text())
    spec = EncoderSpec(**info["spec"])
    v = info["vocab"]
    vocab = Vocab(v["text_size"], v["image_size"], v["num_sentinels"])
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: new_encoder(spec, 0))))
    z = storage.load_npz(enc_dir / PARAMS)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = []
    for path, a in leaves:
        key = jax.tree_util.keystr(path)
        if key not in z or z[key].shape != a.shape:
            raise ValueError(f"{enc_dir / PARAMS}: parameter {key} missing or of the wrong "
                             f"shape (expected {a.shape})")
        values.append(jnp.asarray(z[key]))
    digest = hashlib.sha256((enc_dir / PARAMS).read_bytes()).hexdigest()[:16]
    return BuiltinEncoder(spec, jax.tree_util.tree_unflatten(treedef, values), vocab, batch,
                          f"builtin-{digest}")


def validate_for_training(r: RetrievalConfig) -> None:
    if r.encoder != "builtin":
        raise ConfigError(f"retrieval.encoder={r.encoder!r}: only the builtin encoder is trained")
