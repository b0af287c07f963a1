"""Weights of transformers' `ChameleonVQVAE` (a PyTorch state dict) -> our VQ-GAN.

Chameleon's checkpoint holds the encoder, `quant_conv`, the codebook and `post_quant_conv`
but no decoder (transformers drops it), so the decoder keeps the weights it is given.
Layouts: torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]; the attention blocks'
1x1 convs -> dense [in, out]; GroupNorm weight -> scale. torch is not imported here: the
state dict may hold torch tensors or numpy arrays.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cm3leon_jax.model.vqgan import VQGANConfig
from cm3leon_jax.tokenizers.image import flatten, unflatten

_FROM_CHAMELEON = ("encoder/", "quant_conv/", "post_quant_conv/", "codebook")


def config_from_chameleon(hf: Any) -> VQGANConfig:
    """Our config for a `ChameleonVQVAEConfig` (or any object with its attributes)."""
    if hf.double_latent:
        raise ValueError("ChameleonVQVAEConfig.double_latent=True has no VQ-GAN counterpart")
    if hf.in_channels != 3:
        raise ValueError(f"ChameleonVQVAEConfig.in_channels={hf.in_channels}: only RGB (3)")
    return VQGANConfig(
        resolution=hf.resolution, base_channels=hf.base_channels,
        channel_mult=tuple(hf.channel_multiplier), num_res_blocks=hf.num_res_blocks,
        attn_resolutions=tuple(hf.attn_resolutions or ()) if hf.attn_type == "vanilla" else (),
        mid_attn=hf.attn_type == "vanilla", norm_groups=32, z_channels=hf.latent_channels,
        embed_dim=hf.embed_dim, codebook_size=hf.num_embeddings)


def _torch_name(name: str) -> str:
    if name == "codebook":
        return "quantize.embedding.weight"
    name = name.replace("/resample/", "/downsample/")
    for ours, theirs in (("/kernel", "/weight"), ("/scale", "/weight")):
        if name.endswith(ours):
            name = name[: -len(ours)] + theirs
    return name.replace("/", ".")


def _to_flax(name: str, w: np.ndarray, like: tuple) -> np.ndarray:
    if name.endswith("/kernel") and w.ndim == 4:
        w = w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
        if len(like) == 2:  # attention q/k/v/proj_out: 1x1 conv -> dense
            w = w[0, 0]
    return w


def params_from_chameleon(state_dict: Mapping[str, Any], cfg: VQGANConfig,
                          params: dict) -> dict:
    """`params` (our nested dict) with every Chameleon-held weight replaced from `state_dict`."""
    flat = flatten(params)
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
          for k, v in state_dict.items()}
    used = set()
    for name in flat:
        if not name.startswith(_FROM_CHAMELEON):
            continue
        key = _torch_name(name)
        if key not in sd:
            raise KeyError(f"Chameleon state dict has no {key!r} (for our {name}); "
                           "does the config match the checkpoint?")
        flat[name] = _to_flax(name, sd[key], flat[name].shape)
        used.add(key)
    unused = sorted(k for k in sd if k not in used)
    if unused:
        raise KeyError(f"Chameleon weights with no place in our model (config mismatch?): "
                       f"{unused[:5]}")
    return unflatten(flat, params, "Chameleon state dict")
