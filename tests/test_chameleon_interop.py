"""Parity with transformers' ChameleonVQVAE: same weights, same encoder outputs and codes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
chameleon = pytest.importorskip("transformers.models.chameleon.modeling_chameleon")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import ChameleonVQVAEConfig  # noqa: E402

from cm3leon_jax.tokenizers.chameleon import config_from_chameleon, params_from_chameleon  # noqa: E402
from cm3leon_jax.tokenizers.image import graphdef, init_params  # noqa: E402


def _hf_model(seed: int):
    """A small random Chameleon VQ: two levels, attention in both 16x16 blocks and the middle."""
    torch.manual_seed(seed)
    hf_cfg = ChameleonVQVAEConfig(resolution=32, base_channels=32, channel_multiplier=[1, 2],
                                  num_res_blocks=2, attn_resolutions=[16], latent_channels=16,
                                  embed_dim=8, num_embeddings=64)
    model = chameleon.ChameleonVQVAE(hf_cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere, GroupNorm affine included
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 4:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    return hf_cfg, model


def test_codes_and_encoder_outputs_match_chameleon():
    seed = 0
    hf_cfg, model = _hf_model(seed)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        hidden = model.encoder(pixels)
        pre_quant = model.quant_conv(hidden)
        # codes spread over the codebook: codes drawn from the pre-quantisation vectors
        flat = pre_quant.permute(0, 2, 3, 1).reshape(-1, 8)
        pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:64]
        model.quantize.embedding.weight.copy_(flat[pick] + 0.05 * torch.randn(64, 8))
        out = model.encode(pixels, return_dict=True)

    cfg = config_from_chameleon(hf_cfg)
    assert cfg.tokens_per_image == out.image_tokens.numel() // 4
    params = params_from_chameleon(model.state_dict(), cfg, init_params(cfg))
    gdef = graphdef(cfg)
    x = jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())

    @jax.jit
    def ours(p):
        m = nnx.merge(gdef, p)
        return m.encoder(x), m.embed(x), m.encode(x)

    enc, z, codes = ours(params)
    np.testing.assert_allclose(enc, hidden.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(z, pre_quant.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
    theirs = out.image_tokens.reshape(4, -1).numpy()
    np.testing.assert_array_equal(np.asarray(codes).reshape(4, -1), theirs)
    assert len(np.unique(theirs)) > 16  # the comparison covers many different codes


def test_mismatched_config_is_reported():
    hf_cfg, model = _hf_model(0)
    cfg = config_from_chameleon(hf_cfg)
    wrong = cfg.__class__(**{**cfg.__dict__, "mid_attn": False})
    with pytest.raises(KeyError, match="no place in our model"):
        params_from_chameleon(model.state_dict(), wrong, init_params(wrong))
