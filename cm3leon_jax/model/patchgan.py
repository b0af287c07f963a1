"""The patch-GAN discriminator of taming's VQGAN (pix2pix `NLayerDiscriminator`).

4x4 convs: stride 2 with `layers` doublings of the width (capped at 8x), one stride-1 conv,
then a 1-channel map of per-patch real/fake scores. taming uses BatchNorm; GroupNorm is used
here so the discriminator has no running statistics and does not depend on the batch.
"""

from __future__ import annotations

import jax
from flax import nnx


class PatchGAN(nnx.Module):
    def __init__(self, channels: int = 64, layers: int = 3, *, rngs: nnx.Rngs):
        convs, norms, c = [nnx.Conv(3, channels, (4, 4), strides=2, padding=1, rngs=rngs)], [], channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            convs.append(nnx.Conv(c, out, (4, 4), strides=2 if n < layers else 1, padding=1,
                                  use_bias=False, rngs=rngs))
            norms.append(nnx.GroupNorm(out, num_groups=min(32, out), rngs=rngs))
            c = out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.head = nnx.Conv(c, 1, (4, 4), strides=1, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Scores [B, h, w] for images [B, H, W, 3] in [-1, 1]."""
        x = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms):
            x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
        return self.head(x)[..., 0]
