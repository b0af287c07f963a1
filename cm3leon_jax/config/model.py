"""Sections `vocab`, `model` and `mesh`: the unified vocabulary, the decoder's shape (with
its parameter and FLOP counts, pure arithmetic on the config) and the device mesh."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cm3leon_jax.config.loader import ConfigError, nonnegative, positive
from cm3leon_jax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class VocabConfig:
    text_size: int = 56320  # sentencepiece pieces (an upper bound: spare ids are never produced)
    image_size: int = 8192  # VQ codebook entries (must equal the image tokenizer's)
    num_sentinels: int = 512  # <mask:i> tokens for CM3 spans

    def build(self) -> Vocab:
        return Vocab(self.text_size, self.image_size, self.num_sentinels)

    def check(self) -> None:
        try:
            self.build()
        except ValueError as e:
            raise ConfigError(str(e)) from None


SPLASH_BLOCK = 512  # splash attention's largest block along the sequence (MaxText's default)
SPLASH_MIN_BLOCK = 128  # TPU lanes: splash needs rows of a multiple of this


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 24  # decoder blocks
    d_model: int = 1024  # residual width
    n_heads: int = 16  # attention heads (divides d_model)
    d_ff: int = 4096  # FFN hidden width
    max_seq_len: int = 4096  # longest row (and the rows of the learned position table)
    positions: Literal["learned", "rope"] = "learned"  # the paper's learned table, or rotary
    rope_theta: float = 10000.0  # rotary base wavelength (model.positions=rope)
    activation: Literal["relu", "gelu"] = "relu"  # FFN nonlinearity
    tie_embeddings: bool = True  # the output projection is the input embedding
    qk_norm: bool = False  # Chameleon: LayerNorm on queries and keys
    swin_norm: bool = False  # Chameleon: x + norm(f(x)) instead of x + f(norm(x))
    z_loss: float = 0.0  # Chameleon: 1e-5 * log^2 Z; 0 disables
    init_std: float = 0.006  # truncated normal at +-3 std
    pos_init_std: float = 0.0002  # init std of the learned position table
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype; params stay float32
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "full"  # what backward recomputes
    logits_chunk: int = 0  # >0: compute the loss over sequence chunks of this many tokens
    attention: Literal["auto", "xla", "splash"] = "auto"  # kernel (auto: splash on TPU, else xla)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check(self) -> None:
        positive("model", self, "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len",
                 "init_std", "pos_init_std", "rope_theta")
        nonnegative("model", self, "z_loss", "logits_chunk")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide "
                              f"model.d_model={self.d_model}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.positions=rope rotates pairs of a head's dimensions; "
                              f"model.head_dim={self.head_dim} (d_model / n_heads) is odd")

    def param_counts(self, vocab_size: int) -> dict[str, int]:
        d, L = self.d_model, self.n_layers
        per_layer = 4 * d * d + 2 * d * self.d_ff  # qkv + attention out + the two FFN matrices
        if self.qk_norm:
            per_layer += 2 * d  # per-head scales on q and k
        counts = {
            "embedding": vocab_size * d,
            "positions": self.max_seq_len * d if self.positions == "learned" else 0,
            "layers": L * per_layer,
            "lm_head": 0 if self.tie_embeddings else d * vocab_size,
        }
        counts["total"] = sum(counts.values())
        return counts

    def matmul_params(self, vocab_size: int) -> int:
        """Parameters a token is multiplied with: the layer matrices and the output
        projection (the embedding lookup and the position table do no matmul)."""
        d = self.d_model
        return self.n_layers * (4 * d * d + 2 * d * self.d_ff) + d * vocab_size

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + causal attention.

        Attention scores and the weighted sum cost 4*T*d per token and layer forward over
        the full T x T matrix; causal masking halves that (MaxText's accounting since its
        PR #1988), and backward doubles forward: 6*L*T*d.
        """
        return 6.0 * self.matmul_params(vocab_size) + 6.0 * self.n_layers * seq_len * self.d_model


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # pure data parallelism (replicated parameters)
    fsdp: int = -1  # parameters and batch split over these devices; -1: all devices left over
    tensor: int = 1  # heads, FFN and vocabulary split over these devices

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        fixed = 1
        for s in sizes:
            if s != -1:
                fixed *= s
        if sizes.count(-1) == 1:
            if num_devices % fixed:
                raise ConfigError(
                    f"mesh: {num_devices} devices are not divisible by the fixed axes "
                    f"(data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})")
            sizes[sizes.index(-1)] = num_devices // fixed
        if sizes[0] * sizes[1] * sizes[2] != num_devices:
            raise ConfigError(
                f"mesh: data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} = "
                f"{sizes[0] * sizes[1] * sizes[2]} does not match the {num_devices} devices")
        return tuple(sizes)

    def check(self) -> None:
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{name}={v} must be a positive size or -1")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
