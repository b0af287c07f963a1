"""Sections `vqgan` (the image tokenizer's shape) and `vqgan_train` (its training)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cm3leon_jax.config.loader import ConfigError, nonnegative, positive


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The image tokenizer's shape (taming/Chameleon VQ-GAN); the model is model/vqgan.py."""
    resolution: int = 256  # input images are resolution x resolution RGB
    base_channels: int = 128  # taming `ch`
    channel_mult: tuple[int, ...] = (1, 1, 2, 4)  # one level each; len-1 stride-2 downsamples
    num_res_blocks: int = 2  # per encoder level (the decoder has one more, as taming)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes that get attention blocks
    mid_attn: bool = True  # attention in the middle block (Chameleon attn_type "vanilla")
    norm_groups: int = 32  # GroupNorm groups (eps 1e-6, as taming)
    z_channels: int = 256  # encoder output channels (Chameleon latent_channels)
    embed_dim: int = 256  # quant_conv output size (the code size unless codebook_dim)
    codebook_size: int = 8192  # codes (= vocab.image_size)
    codebook_l2_norm: bool = False  # l2-normalise vectors and codes before the lookup (LlamaGen)
    codebook_dim: int | None = None  # lookup size (embed_dim -> this -> embed_dim); null: embed_dim

    @property
    def code_dim(self) -> int:
        """Size of the codebook's vectors (the space the nearest-code lookup runs in)."""
        return self.embed_dim if self.codebook_dim is None else self.codebook_dim

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size ** 2

    def check(self) -> None:
        """Also run when a saved tokenizer is loaded."""
        positive("vqgan", self, "resolution", "base_channels", "num_res_blocks", "norm_groups",
                 "z_channels", "embed_dim", "codebook_size", "codebook_dim")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ConfigError(f"vqgan.channel_mult={list(self.channel_mult)} must be a non-empty "
                              "list of positive multipliers")
        if self.resolution % self.downsample:
            raise ConfigError(f"vqgan.resolution={self.resolution} is not divisible by the "
                              f"downsampling factor {self.downsample} "
                              "(2^(len(vqgan.channel_mult)-1))")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ConfigError(f"vqgan.norm_groups={self.norm_groups} does not divide "
                                  f"vqgan.base_channels x {m} = {self.base_channels * m}")


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig:
    """`cm3leon tokenizer train-image`: images from the shapes source, Adam."""
    steps: int = 5000  # Adam updates
    batch_size: int = 32  # images per update
    lr: float = 1e-4  # learning rate (peak, with schedule cosine)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr decays to 0 at `steps`
    b1: float = 0.5  # Adam beta 1 (taming's GAN setting)
    b2: float = 0.9  # Adam beta 2
    recon_loss: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss
    beta: float = 0.25  # commitment weight
    codebook_weight: float = 1.0  # weight of codebook + beta x commitment
    restart_every: int = 100  # re-seed codes unused for this many steps from encoder outputs; 0: never
    disc_weight: float = 0.0  # patch-GAN generator loss weight; 0: no discriminator
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"  # GAN loss of both players
    adaptive_weight: bool = False  # times taming's gradient-norm ratio (rec / GAN, last layer)
    lecam_weight: float = 0.0  # LeCam regulariser of the discriminator (LlamaGen); 0: off
    disc_start: int = 0  # step at which the GAN losses switch on
    disc_channels: int = 64  # patch-GAN base channels
    disc_layers: int = 3  # patch-GAN stride-2 layers
    perceptual_weight: float = 0.0  # LPIPS term in the reconstruction loss; 0: none
    lpips_vgg: str | None = None  # torchvision's vgg16-397923af.pth (or .npz/.safetensors)
    lpips_heads: str | None = None  # lpips' weights/v0.1/vgg.pth (or .npz/.safetensors)
    images: int = 20000  # training images drawn from the shapes source
    eval_images: int = 512  # held-out images for the final PSNR and codebook usage
    seed: int = 0  # init, image draw and batch order
    log_every: int = 50  # steps between metrics.jsonl lines

    def check(self) -> None:
        for key in ("steps", "batch_size", "lr", "b1", "b2", "images", "eval_images",
                    "log_every", "disc_channels", "disc_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"vqgan_train.{key}={getattr(self, key)} must be > 0")
        nonnegative("vqgan_train", self, "beta", "codebook_weight", "restart_every",
                    "disc_weight", "disc_start", "lecam_weight", "perceptual_weight")
        if not (self.b1 < 1 and self.b2 < 1):
            raise ConfigError(f"vqgan_train.b1={self.b1}, vqgan_train.b2={self.b2} must be in "
                              "(0, 1)")
        if self.disc_weight == 0:
            for key, off in (("adaptive_weight", False), ("lecam_weight", 0.0),
                             ("disc_loss", "hinge")):
                if getattr(self, key) != off:
                    raise ConfigError(f"vqgan_train.{key}={getattr(self, key)} shapes the GAN, "
                                      "which is off (vqgan_train.disc_weight=0); set "
                                      "disc_weight > 0 or drop it")
        given = self.lpips_vgg is not None and self.lpips_heads is not None
        if self.perceptual_weight > 0 and not given:
            raise ConfigError(f"vqgan_train.perceptual_weight={self.perceptual_weight} needs the "
                              "published LPIPS weights: set vqgan_train.lpips_vgg (torchvision's "
                              "vgg16-397923af.pth) and vqgan_train.lpips_heads (lpips' "
                              "v0.1/vgg.pth); a random VGG is no perceptual loss")
        if self.perceptual_weight == 0 and (self.lpips_vgg or self.lpips_heads):
            raise ConfigError("vqgan_train.lpips_vgg / lpips_heads are given but "
                              "vqgan_train.perceptual_weight=0 does not use them; set "
                              "perceptual_weight > 0 or drop them")
