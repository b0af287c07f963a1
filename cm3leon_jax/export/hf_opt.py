"""The HF OPT export: a directory that transformers' `OPTForCausalLM.from_pretrained` loads,
with its `generation_config.json`, its weights in safetensors files of at most `shard_bytes`
(`model.safetensors`, or `model-00001-of-0000N.safetensors` ... with
`model.safetensors.index.json`, split by huggingface_hub's own rule) and, when the run has
tokenizers, a tokenizer `AutoTokenizer` loads (hf_tokenizer.py) and a model card (model_card.py).

OPT with `enable_bias=False` and `layer_norm_elementwise_affine=False` is our decoder
(metaseq's `disable_bias` / `disable_affine_ln`, prior_art.md §2.7): pre-LN, LayerNorm
eps 1e-5, attention scale head_dim^-0.5, ReLU FFN, tied embeddings. The differences are
layout only:
- learned positions are offset by 2 (row p of ours is row p + 2 of theirs; rows 0 and 1
  are written as zeros and never read when positions start at 0);
- q/k/v are separate `nn.Linear` weights [h*hd, d] (ours: one fused [d, 3, h, hd]);
- torch Linear weights are [out, in] (ours: [in, out]).
Positions in OPT come from the attention mask (cumsum - 1), so left-padded batches shift
them; pass `position_ids` for those.

Each per-layer tensor is cut from the stacked parameters on the devices and gathered alone.
"""

from __future__ import annotations

import functools

import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from jax.sharding import Mesh

from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.export import tensor_file

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
SHARD_BYTES = 5 * 10**9  # largest weights file by default: the Hub's (huggingface_hub)
WEIGHTS = "model{suffix}.safetensors"  # suffix "" for one file, "-00001-of-00003" for shards
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
CARD = "README.md"
# Our activation -> transformers' ACT2FN name. jax.nn.gelu defaults to the tanh form.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new"}


def check(cfg: Config) -> None:
    """Refuse model options OPT cannot express, before any array is read."""
    m = cfg.model
    if m.qk_norm:
        raise ConfigError("model.qk_norm=true: OPT has no LayerNorm on queries and keys; "
                          "export with --format safetensors instead")
    if m.swin_norm:
        raise ConfigError("model.swin_norm=true: OPT only has the pre-LN order "
                          "(x + f(norm(x))); export with --format safetensors instead")
    if m.positions != "learned":
        raise ConfigError(f"model.positions={m.positions!r}: OPT only has learned absolute "
                          "positions; export with --format safetensors instead")
    if m.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={m.activation!r} has no OPT activation_function")


def config_json(cfg: Config) -> dict:
    m, vocab = cfg.model, cfg.vocab.build()
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": vocab.size,
        "hidden_size": m.d_model,
        "word_embed_proj_dim": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "ffn_dim": m.d_ff,
        "max_position_embeddings": m.max_seq_len,
        "activation_function": ACTIVATIONS[m.activation],
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "enable_bias": False,
        "layer_norm_elementwise_affine": False,
        "tie_word_embeddings": m.tie_embeddings,
        "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0,
        "init_std": m.init_std,
        "pad_token_id": vocab.pad, "bos_token_id": vocab.eos, "eos_token_id": vocab.eos,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def generation_config(cfg: Config) -> dict:
    """`generation_config.json`: the run's sampling settings where transformers has them. A
    generated span ends at `<eos>` (a document) or `<eoss>` (an infill, a caption)."""
    g, vocab = cfg.generate, cfg.vocab.build()
    out = {"bos_token_id": vocab.eos, "eos_token_id": [vocab.eos, vocab.eoss],
           "pad_token_id": vocab.pad, "max_length": cfg.model.max_seq_len,
           "do_sample": g.temperature > 0}
    if g.temperature > 0:
        out.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    return out


def shards(files: list[tensor_file.Tensor], shard_bytes: int) -> tuple[dict, dict | None]:
    """({file name: its tensors}, the index, None for a single file): tensors in order, a new
    file whenever the next would pass `shard_bytes` (a larger tensor gets a file of its own)."""
    split = split_state_dict_into_shards_factory(
        {t.name: t for t in files}, get_storage_size=lambda t: t.nbytes,
        filename_pattern=WEIGHTS, max_shard_size=shard_bytes)
    by_name = {t.name: t for t in files}
    out = {f: [by_name[n] for n in names] for f, names in split.filename_to_tensors.items()}
    index = ({"metadata": split.metadata, "weight_map": split.tensor_to_filename}
             if split.is_sharded else None)
    return out, index


# Per-layer transforms: (stacked parameter, layer index) -> one torch-layout weight.
def _q(qkv, i, which):
    w = qkv[i][:, which]  # [d, h, hd]
    return w.reshape(w.shape[0], -1).T


def _out(out, i):
    w = out[i]  # [h, hd, d]
    return w.reshape(-1, w.shape[-1]).T


def _transpose(w, i):
    return w[i].T


def _t(w):
    return w.T


PROJ = {"q_proj": functools.partial(_q, which=0), "k_proj": functools.partial(_q, which=1),
        "v_proj": functools.partial(_q, which=2)}


def tensors(cfg: Config, params: dict, mesh: Mesh):
    m = cfg.model
    d, hd_all = m.d_model, m.n_heads * m.head_dim
    f32 = np.dtype(np.float32)

    def fetch(fn, *args):  # one piece: the whole (per-layer) tensor, gathered on its own
        return functools.partial(tensor_file.fetch, fn, mesh, *args)

    embed, pos, blocks = params["embed"], params["pos"], params["blocks"]
    out = [
        tensor_file.Tensor("model.decoder.embed_tokens.weight", tuple(embed.shape), f32,
                           tensor_file.row_pieces(embed, mesh)),
        tensor_file.Tensor("model.decoder.embed_positions.weight",
                           (m.max_seq_len + POSITION_OFFSET, d), f32,
                           [lambda: np.zeros((POSITION_OFFSET, d), np.float32),
                            *tensor_file.row_pieces(pos, mesh)]),
    ]
    for i in range(m.n_layers):
        layer = f"model.decoder.layers.{i}"
        idx = np.int32(i)
        for name, fn in PROJ.items():
            out.append(tensor_file.Tensor(f"{layer}.self_attn.{name}.weight", (hd_all, d), f32,
                                          [fetch(fn, blocks["attn"]["qkv"], idx)]))
        out += [
            tensor_file.Tensor(f"{layer}.self_attn.out_proj.weight", (d, hd_all), f32,
                               [fetch(_out, blocks["attn"]["out"], idx)]),
            tensor_file.Tensor(f"{layer}.fc1.weight", (m.d_ff, d), f32,
                               [fetch(_transpose, blocks["ffn"]["w_in"], idx)]),
            tensor_file.Tensor(f"{layer}.fc2.weight", (d, m.d_ff), f32,
                               [fetch(_transpose, blocks["ffn"]["w_out"], idx)]),
        ]
    if not m.tie_embeddings:
        head = params["head"]  # [d, V]
        out.append(tensor_file.Tensor("lm_head.weight", (head.shape[1], d), f32,
                                      [fetch(_t, head)]))
    return out

