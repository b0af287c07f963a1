"""The image tokenizer: a VQ-GAN in the taming / Chameleon family (NHWC, float32).

Encoder: 3x3 conv_in, per level `num_res_blocks` ResNet blocks (GroupNorm eps 1e-6, swish,
3x3 conv, twice; 1x1 shortcut when channels change), attention where the feature map size
is in `attn_resolutions`, a stride-2 3x3 downsample with right/bottom zero padding after
every level but the last; middle ResBlock, single-head attention, ResBlock; GroupNorm,
swish, 3x3 conv to `z_channels`; 1x1 `quant_conv` to `embed_dim`. Quantizer: nearest code
by squared distance (z^2 + e^2 - 2ze, as Chameleon), straight-through gradients. Decoder:
the mirror image (taming): `num_res_blocks + 1` blocks per level, nearest x2 + 3x3 conv
upsampling. Module names follow taming/Chameleon so their weights map one to one
(tokenizers/chameleon.py).

Two options of the lookup (LlamaGen / ViT-VQGAN), both off by default, where the model is
exactly the one above: `codebook_dim` adds a linear `quant_proj` embed_dim -> codebook_dim
before the lookup and `post_quant_proj` back after it, so the codes are codebook_dim-sized;
`codebook_l2_norm` l2-normalises the vectors and the codes before the lookup (nearest code
= highest cosine), and the decoder gets the normalised code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.config import VQGANConfig

__all__ = ["VQGAN", "VQGANConfig", "quantize"]


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def _norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance: matches torch.nn.GroupNorm to float32 rounding.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                         rngs=rngs)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, stride: int = 1,
          padding="SAME") -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, rngs=rngs)


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, groups, rngs)
        self.conv1 = _conv(cin, cout, 3, rngs)
        self.norm2 = _norm(cout, groups, rngs)
        self.conv2 = _conv(cout, cout, 3, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions of the feature map."""

    def __init__(self, channels: int, groups: int, rngs: nnx.Rngs):
        self.norm = _norm(channels, groups, rngs)
        self.q = nnx.Linear(channels, channels, rngs=rngs)
        self.k = nnx.Linear(channels, channels, rngs=rngs)
        self.v = nnx.Linear(channels, channels, rngs=rngs)
        self.proj_out = nnx.Linear(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.norm(x).reshape(b, h * w, c)
        q, k, v = self.q(y), self.k(y), self.v(y)
        attn = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c ** -0.5, axis=-1)
        out = self.proj_out(jnp.einsum("bij,bjc->bic", attn, v))
        return x + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs, stride=2, padding="VALID")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution: ResBlocks (each optionally followed by attention), then a resample."""

    def __init__(self, channels: list[tuple[int, int]], attn: bool, groups: int,
                 resample: nnx.Module | None, rngs: nnx.Rngs):
        self.block = nnx.List([ResBlock(cin, cout, groups, rngs) for cin, cout in channels])
        self.attn = nnx.List([AttnBlock(cout, groups, rngs) for _, cout in channels] if attn
                             else [])
        self.resample = resample

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x if self.resample is None else self.resample(x)


class Mid(nnx.Module):
    def __init__(self, channels: int, attn: bool, groups: int, rngs: nnx.Rngs):
        self.block_1 = ResBlock(channels, channels, groups, rngs)
        self.attn_1 = AttnBlock(channels, groups, rngs) if attn else None
        self.block_2 = ResBlock(channels, channels, groups, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        self.conv_in = _conv(3, ch, 3, rngs)
        levels, res, cin = [], cfg.resolution, ch
        for i, m in enumerate(mult):
            cout = ch * m
            chans = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            last = i == len(mult) - 1
            levels.append(Level(chans, res in cfg.attn_resolutions, g,
                                None if last else Downsample(cout, rngs), rngs))
            cin, res = cout, res if last else res // 2
        self.down = nnx.List(levels)
        self.mid = Mid(cin, cfg.mid_attn, g, rngs)
        self.norm_out = _norm(cin, g, rngs)
        self.conv_out = _conv(cin, cfg.z_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(swish(self.norm_out(self.mid(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        cin = ch * mult[-1]
        self.conv_in = _conv(cfg.z_channels, cin, 3, rngs)
        self.mid = Mid(cin, cfg.mid_attn, g, rngs)
        levels, res = [], cfg.latent_size
        for i in reversed(range(len(mult))):  # built lowest resolution first, run in order
            cout = ch * mult[i]
            chans = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)]
            levels.append(Level(chans, res in cfg.attn_resolutions, g,
                                Upsample(cout, rngs) if i else None, rngs))
            cin, res = cout, res * 2
        self.up = nnx.List(levels)
        self.norm_out = _norm(cin, g, rngs)
        self.conv_out = _conv(cin, 3, 3, rngs)

    def features(self, z: jax.Array) -> jax.Array:
        """The input of `conv_out`, the last layer (the GAN's adaptive weight is taken there)."""
        x = self.mid(self.conv_in(z))
        for level in self.up:
            x = level(x)
        return swish(self.norm_out(x))

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z))


def quantize(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code for every vector of z [..., D] (first index on ties)."""
    flat = z.reshape(-1, z.shape[-1])
    d = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)
         - 2 * flat @ codebook.T)
    return jnp.argmin(d, axis=1).astype(jnp.int32).reshape(z.shape[:-1])


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) over the last axis (torch's F.normalize), finite gradient at 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class VQGAN(nnx.Module):
    """encode: images in [-1, 1] -> codes; decode: codes -> images; __call__ for training."""

    def __init__(self, cfg: VQGANConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.quant_conv = _conv(cfg.z_channels, cfg.embed_dim, 1, rngs)
        d, k = cfg.code_dim, cfg.codebook_size
        low = cfg.codebook_dim is not None
        self.quant_proj = nnx.Linear(cfg.embed_dim, d, rngs=rngs) if low else None
        # taming: uniform(-1/K, 1/K)
        self.codebook = nnx.Param(jax.random.uniform(rngs.params(), (k, d), jnp.float32,
                                                     -1.0 / k, 1.0 / k))
        self.post_quant_proj = nnx.Linear(d, cfg.embed_dim, rngs=rngs) if low else None
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, rngs)
        self.decoder = Decoder(cfg, rngs)

    def embed(self, x: jax.Array) -> jax.Array:
        """Vectors [B, h, w, code_dim] that are looked up, of images [B, H, W, 3] in [-1, 1]."""
        z = self.quant_conv(self.encoder(x))
        if self.quant_proj is not None:
            z = self.quant_proj(z)
        return l2_normalize(z) if self.cfg.codebook_l2_norm else z

    def codes_table(self) -> jax.Array:
        """The codes as the lookup and the decoder see them [codebook_size, code_dim]."""
        book = self.codebook[...]
        return l2_normalize(book) if self.cfg.codebook_l2_norm else book

    def encode(self, x: jax.Array) -> jax.Array:
        """Codes [B, h, w] (int32, 0..codebook_size-1)."""
        return quantize(self.embed(x), self.codes_table())

    def decoder_input(self, zq: jax.Array) -> jax.Array:
        """Looked-up vectors [B, h, w, code_dim] -> the decoder's input [B, h, w, z_channels]."""
        if self.post_quant_proj is not None:
            zq = self.post_quant_proj(zq)
        return self.post_quant_conv(zq)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in about [-1, 1] from codes [B, h, w]."""
        return self.decoder(self.decoder_input(jnp.take(self.codes_table(), codes, axis=0)))

    def quantized(self, x: jax.Array):
        """(straight-through code vectors, codes, z, codebook loss, commitment loss).

        Codebook loss ||sg(z) - e||^2 trains the codes; commitment ||z - sg(e)||^2 (weighted
        by beta by the caller) keeps the encoder near them. (taming's default `legacy` mode
        and Chameleon put beta on the codebook term instead.) z and e are the vectors the
        lookup compares (`embed`, `codes_table`).
        """
        z = self.embed(x)
        book = self.codes_table()
        codes = quantize(z, book)
        zq = jnp.take(book, codes, axis=0)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - zq) ** 2)
        commit_loss = jnp.mean((z - jax.lax.stop_gradient(zq)) ** 2)
        return z + jax.lax.stop_gradient(zq - z), codes, z, codebook_loss, commit_loss

    def __call__(self, x: jax.Array):
        """(reconstruction, codes, z, codebook loss, commitment loss); see `quantized`."""
        zq, codes, z, codebook_loss, commit_loss = self.quantized(x)
        recon = self.decoder(self.decoder_input(zq))
        return recon, codes, z, codebook_loss, commit_loss
