"""Which files of a prepared data directory an export carries: the tokenizers.

An export must be enough to rebuild and sample the model, so it takes the text tokenizer
(sentencepiece model), the vocabulary and the image tokenizer (VQ-GAN weights and config)
of the run's `data.dir`. The rule is deliberately loose, so it follows the data stage's
layout without depending on its file names: every top-level entry of `data.dir` whose name
mentions a tokenizer, the vocabulary, sentencepiece or the VQ-GAN, every `*.model` /
`*.vocab` file, and `manifest.json` (which records the tokenizer paths) is copied, whole
directories included, into `EXPORT/tokenizers/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cm3leon_jax.config import ConfigError

NAME_PARTS = ("tokenizer", "vocab", "sentencepiece", "spm", "vqgan", "vq_gan", "vqvae")
SUFFIXES = (".model", ".vocab")
EXTRA = ("manifest.json",)
SUBDIR = "tokenizers"


def tokenizer_entries(data_dir: str | Path) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"data.dir={str(data_dir)!r} does not exist here, so its tokenizers "
                          "cannot be exported (pass --skip-tokenizers to export weights only)")
    return sorted(p for p in data_dir.iterdir()
                  if p.name in EXTRA or p.suffix in SUFFIXES
                  or any(part in p.name.lower() for part in NAME_PARTS))


def copy_tokenizers(data_dir: str | Path, out: str | Path) -> list[str]:
    """Copy the tokenizer files of `data_dir` into `out/tokenizers/`; their relative paths."""
    entries = tokenizer_entries(data_dir)
    dest = Path(out) / SUBDIR
    copied = []
    for src in entries:
        dest.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / src.name)
            copied += [str(p.relative_to(out)) for p in sorted((dest / src.name).rglob("*"))
                       if p.is_file()]
        else:
            shutil.copy2(src, dest / src.name)
            copied.append(str((dest / src.name).relative_to(out)))
    return copied
