"""Section `generate`: sampling, guidance and candidate pools for every generation task."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from cm3leon_jax.config.loader import ConfigError, nonnegative, positive


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k best tokens; 0: off
    top_p: float = 0.9  # nucleus; 1.0: off
    cfg_scale: float = 3.0  # alpha_c in uncond + alpha_c (cond - uncond); 1.0: no guidance
    image_cfg_scale: float = 1.5  # two-scale guidance (image + text conditioned generation)
    text_cfg_scale: float = 7.5  # two-scale guidance: the text's scale
    cd_alpha: float = 0.1  # CD-K head: p_cond >= cd_alpha * (k-th largest p_cond)
    cd_k: int = 5  # CD-K: the k of the head
    cd_sample: bool = True  # sample from the CD-K scores; false: take the best
    pool: Literal["topp", "cdk", "mixed"] = "topp"  # how image candidates are drawn
    candidates: int = 1  # candidates per output image, reranked when > 1 (needs a scorer)
    image_tokens: Optional[int] = None  # tokens per image; null: from the image tokenizer
    weights: Literal["float", "int8"] = "float"  # int8: per-channel int8 kernels (model/quant.py)
    max_text_tokens: int = 32  # longest caption / infill
    min_text_tokens: int = 0  # captions / infills / answers: at least this many text pieces
    seed: int = 0  # sampling keys
    speculative: bool = False  # image tokens by speculative Jacobi decoding (SJD)
    jacobi_window: int = 16  # SJD: tokens fed per forward pass, so at most that many accepted

    def check(self) -> None:
        positive("generate", self, "cfg_scale", "cd_alpha", "cd_k", "candidates",
                 "image_tokens", "max_text_tokens")
        nonnegative("generate", self, "temperature", "top_k", "image_cfg_scale",
                    "text_cfg_scale")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_text_tokens <= self.max_text_tokens:
            raise ConfigError(f"generate.min_text_tokens={self.min_text_tokens} must be in "
                              f"[0, generate.max_text_tokens={self.max_text_tokens}]")
        if self.cd_alpha > 1:
            raise ConfigError(f"generate.cd_alpha={self.cd_alpha} must be in (0, 1]")
        if self.speculative and self.jacobi_window < 2:
            raise ConfigError(f"generate.jacobi_window={self.jacobi_window} must be >= 2 with "
                              "generate.speculative=true (1 runs no drafts: set "
                              "speculative=false)")
        if self.pool == "mixed" and self.candidates < 2:
            raise ConfigError("generate.pool=mixed needs generate.candidates >= 2 "
                              f"(got {self.candidates}): half top-p, half CD-K")
