"""The generation tasks on a loaded model: text -> image (with CFG, CD-K or the mixed
candidate pool), image + text -> image (two-scale guidance), image -> text, text infilling,
and the likelihood of given captions of an image (ranking candidate captions).

Everything here works on token ids of the unified vocabulary; turning text into ids and
image codes into pixels is the tokenizers' job: `load_model` gives a trained model with
its tokenizers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx

from cm3leon_jax.config import Config, ConfigError, GenerateConfig
from cm3leon_jax.generate import prompts
from cm3leon_jax.generate.decode import Decoding, Scales, decode
from cm3leon_jax.model import quant
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.tokenizers.directory import Tokenizers, load_tokenizers
from cm3leon_jax.train import weights
from cm3leon_jax.vocab import Vocab

TEXT_STOP = ("eoss", "eos", "brk")  # a caption or infill ends at the first of these
MIN_CAPTION_TOKENS = 1  # a caption is never empty, whatever generate.min_text_tokens says


@dataclasses.dataclass(frozen=True)
class Model:
    """What decoding needs: the model graph, its parameters, vocabulary and mesh."""
    graphdef: Any
    params: dict
    vocab: Vocab
    max_seq_len: int
    mesh: Any = None  # a jax Mesh: decode sharded like training; None: one device


def load_model(path, step: int | None = None,
               overrides: list[str] = ()) -> tuple[Config, Model, Tokenizers, int]:
    """(config, model, tokenizers, step) of a run directory (its checkpoint `step`, else the
    latest) or an export: the parameters on the devices (train/weights.py; int8 kernels with
    `generate.weights=int8`) and the tokenizers the model was trained with
    (`weights.tokenizer_dir`)."""
    w = weights.load(path, step, overrides=overrides)
    found = weights.tokenizer_dir(w.cfg, path)
    if found is None:
        raise ConfigError(f"{path}: {weights.NO_TOKENIZERS}")
    toks = load_tokenizers(found[0], w.cfg.vocab.build(), where=found[1])
    params = w.params
    if w.cfg.generate.weights == "int8":  # int8 kernels in HBM, dequantized per layer where used
        params = quant.quantize_placed(params, w.mdef.param_axes, w.mesh)
    model = Model(w.mdef.graphdef, params, toks.vocab, w.cfg.model.max_seq_len, w.mesh)
    return w.cfg, model, toks, w.step


def _sampling(g: GenerateConfig) -> dict:
    return dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)


def _window(g: GenerateConfig) -> int:
    """Image tokens by speculative Jacobi decoding (generate.speculative), else 0: one at a
    time."""
    return g.jacobi_window if g.speculative else 0


def candidate_methods(g: GenerateConfig) -> np.ndarray:
    """Per candidate of one prompt: True = CD-K, False = top-p (+ CFG). `mixed` fills the
    first half with top-p and the rest with CD-K (the paper's "1/2 TopP + 1/2 CD-K")."""
    m = g.candidates
    if g.pool == "topp":
        return np.zeros(m, bool)
    if g.pool == "cdk":
        return np.ones(m, bool)
    return np.arange(m) >= m // 2


def _run(model: Model, streams, d: Decoding, seed: int, scales=Scales(),
         use_cdk=None) -> np.ndarray:
    return decode(model.graphdef, model.params, model.vocab, streams, d, scales, seed=seed,
                  use_cdk=use_cdk, mesh=model.mesh, max_seq_len=model.max_seq_len)


def text_to_image(model: Model, captions: list, num_tokens: int, g: GenerateConfig,
                  seed: int | None = None, retrieved: list | None = None) -> np.ndarray:
    """[n, g.candidates, num_tokens] image codes for n captions (text ids).

    Guidance runs when cfg_scale != 1 or any candidate uses CD-K (which needs the
    unconditional stream); candidates of one caption differ by their sampling keys.
    `retrieved`: per caption, documents (ids) put in front of the conditional prompt
    (retrieval at inference); the unconditional prompt stays `<eos> <mask:0> <break>`.
    """
    vocab, m = model.vocab, g.candidates
    methods = np.tile(candidate_methods(g), len(captions))
    guided = g.cfg_scale != 1.0 or methods.any()
    if retrieved is not None and len(retrieved) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(retrieved)} retrieved lists")
    pairs = [prompts.text_to_image(vocab, c) for c in captions for _ in range(m)]
    if retrieved is not None:
        docs = [r for r in retrieved for _ in range(m)]
        pairs = [(prompts.with_retrieved(vocab, c, r), u) for (c, u), r in zip(pairs, docs)]
    streams = [[p[0] for p in pairs]] + ([[p[1] for p in pairs]] if guided else [])
    d = Decoding("image", num_tokens, guidance="cfg" if guided else "none", cd_k=g.cd_k,
                 cd_sample=g.cd_sample, jacobi_window=_window(g), **_sampling(g))
    scales = Scales(cfg=g.cfg_scale, cd_alpha=g.cd_alpha)
    ids = _run(model, streams, d, g.seed if seed is None else seed, scales, methods)
    return vocab.to_codes(ids).reshape(len(captions), m, num_tokens)


def edit_image(model: Model, captions: list, sources: list, num_tokens: int,
               g: GenerateConfig, seed: int | None = None) -> np.ndarray:
    """[n, num_tokens] codes of a new image from a caption and a source image (codes),
    with separate image and text guidance scales (CM3Leon §4.1: 1.5 and 7.5)."""
    if len(captions) != len(sources):
        raise ValueError(f"{len(captions)} captions but {len(sources)} source images")
    vocab = model.vocab
    triples = [prompts.edit_image(vocab, c, vocab.image_ids(s))
               for c, s in zip(captions, sources)]
    return image_from_streams(model, [[t[i] for t in triples] for i in range(3)], num_tokens,
                              g, seed)


def image_from_streams(model: Model, streams: list, num_tokens: int, g: GenerateConfig,
                       seed: int | None = None) -> np.ndarray:
    """[n, num_tokens] image codes from prompts given per guidance stream: [cond] (none),
    [cond, uncond] (CFG at g.cfg_scale) or [full, uncond, image_only] (two-scale guidance
    at g.image_cfg_scale and g.text_cfg_scale); each stream is a list of n prompts."""
    guidance = {1: "none", 2: "cfg", 3: "two_scale"}.get(len(streams))
    if guidance is None:
        raise ValueError(f"{len(streams)} prompt streams: give 1 (no guidance), 2 (CFG) or 3 "
                         "(two-scale)")
    neutral = {"none": True, "cfg": g.cfg_scale == 1.0,
               "two_scale": g.image_cfg_scale == 1.0 and g.text_cfg_scale == 1.0}[guidance]
    if neutral:  # scale 1 mixes back to the conditional logits: decode that stream alone
        streams, guidance = streams[:1], "none"
    d = Decoding("image", num_tokens, guidance=guidance, jacobi_window=_window(g),
                 **_sampling(g))
    scales = Scales(cfg=g.cfg_scale, image=g.image_cfg_scale, text=g.text_cfg_scale)
    return model.vocab.to_codes(_run(model, streams, d, g.seed if seed is None else seed,
                                     scales))


def complete_text(model: Model, rows: list, g: GenerateConfig,
                  seed: int | None = None) -> list[np.ndarray]:
    """The text ids each prompt continues with, up to the first `<eoss>`, `<eos>` or `<break>`."""
    vocab = model.vocab
    d = Decoding("text", g.max_text_tokens, stop=tuple(getattr(vocab, s) for s in TEXT_STOP),
                 min_tokens=g.min_text_tokens, **_sampling(g))
    out = _run(model, [rows], d, g.seed if seed is None else seed)
    return [prompts.text_answer(vocab, r) for r in out]


def image_to_text(model: Model, images: list, g: GenerateConfig,
                  seed: int | None = None) -> list[np.ndarray]:
    """Caption text ids for each image (its codes), by infilling a masked caption, at least
    MIN_CAPTION_TOKENS pieces long: a closing token as the first choice is a blank caption,
    never a useful one (with no minimum, 11% of sampled captions came out empty)."""
    vocab = model.vocab
    g = dataclasses.replace(g, min_text_tokens=max(g.min_text_tokens, MIN_CAPTION_TOKENS))
    return complete_text(model, [prompts.image_to_text(vocab, vocab.image_ids(c))
                                 for c in images], g, seed)


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_logprobs(graphdef, params, tokens):
    """[B, T] right-padded rows -> [B, T-1] log-probs of each next token."""
    return nnx.merge(graphdef, params).token_logprobs(tokens)


def _scored(model: Model, rows: list[tuple[np.ndarray, int]], what: str) -> np.ndarray:
    """[n] float64: the summed log-probs of tokens[first:] of each (tokens, first) row."""
    vocab = model.vocab
    longest = max(len(t) for t, _ in rows)
    if longest > model.max_seq_len:
        raise ValueError(f"a scored {what} of {longest} tokens exceeds model.max_seq_len="
                         f"{model.max_seq_len}")
    n = len(rows)
    if model.mesh is not None:  # rows split over the batch axes, as decoding does
        dp = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
        rows += [rows[-1]] * (-n % dp)
    tokens = np.full((len(rows), longest), vocab.pad, np.int32)
    mask = np.zeros((len(rows), longest - 1), bool)
    for r, (t, first) in enumerate(rows):
        tokens[r, :len(t)] = t
        mask[r, first - 1:len(t) - 1] = True  # predictions of tokens first .. end
    if model.mesh is None:
        logp = _token_logprobs(model.graphdef, model.params, tokens)
    else:
        with jax.set_mesh(model.mesh):
            logp = _token_logprobs(model.graphdef, model.params,
                                   jax.device_put(tokens, mesh_lib.batch_sharding(model.mesh)))
    return np.where(mask, np.asarray(logp, np.float64), 0.0).sum(1)[:n]


def caption_logprobs(model: Model, images: list, captions: list) -> np.ndarray:
    """[n] float64: log p(caption, <eoss> | image) of each (image codes, caption text ids)
    pair, in the image -> text prompt format (`prompts.scored_caption`), so a ranking by it
    is the ranking by how likely the model is to write each caption for the image."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    vocab = model.vocab
    return _scored(model, [prompts.scored_caption(vocab, vocab.image_ids(i), c)
                           for i, c in zip(images, captions)],
                   "caption (prompt + caption + <eoss>)")


def image_logprobs(model: Model, captions: list, images: list,
                   retrieved: list | None = None) -> np.ndarray:
    """[n] float64: log p(image | caption) of each (caption text ids, image codes) pair in the
    text -> image prompt format, with each row's `retrieved` documents in front when given:
    how much a model gains from its retrieved documents, measured without sampling noise."""
    if len(images) != len(captions) or (retrieved is not None and len(retrieved) != len(images)):
        raise ValueError(f"{len(captions)} captions, {len(images)} images and "
                         f"{'no' if retrieved is None else len(retrieved)} retrieved lists")
    vocab = model.vocab
    docs = retrieved if retrieved is not None else [()] * len(images)
    return _scored(model, [prompts.scored_image(vocab, c, vocab.image_ids(i), r)
                           for c, i, r in zip(captions, images, docs)],
                   "image (prompt + retrieved documents + image)")


def infill(model: Model, gaps: list[tuple], g: GenerateConfig,
           seed: int | None = None) -> list[np.ndarray]:
    """Text ids for each (before, after) pair of text ids."""
    return complete_text(model, [prompts.infill(model.vocab, b, a) for b, a in gaps], g, seed)
