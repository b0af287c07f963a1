"""Which files of a prepared data directory an export carries: its two tokenizers.

An export must be enough to rebuild and sample the model, so it takes the text tokenizer and
the image tokenizer of the run's tokenizer directory (`weights.tokenizer_dir`) into
`EXPORT/tokenizers/` under the same names, so the export's tokenizers open like a prepared
directory's (`tokenizers/directory.load_tokenizers`, what `cm3leon generate` reads). Nothing
else: not the data manifest (documents, shards, timings of `prepare`), not the image
tokenizer's training run, not the documents; the vocabulary is the model's own (the export's
`vocab.json` or `cm3leon_export.json`). Either side may be on cloud storage (storage.py).
"""

from __future__ import annotations

import json

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError, VQGANConfig
from cm3leon_jax.config.loader import build
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import Path, PathLike
from cm3leon_jax.tokenizers.image import CONFIG_FILE


def tokenizer_entries(data_dir: PathLike, where: str = "data.dir") -> list[Path]:
    """The tokenizers `data_dir` has (an entry may be missing: it is then not exported)."""
    data = DataDir(data_dir)
    if not data.root.is_dir():
        raise ConfigError(f"{where}: {str(data.root)!r} does not exist here, so its tokenizers "
                          "cannot be exported (pass --skip-tokenizers to export weights only)")
    return [p for p in (data.text_tokenizer, data.image_tokenizer) if p.exists()]


def copy_tokenizers(data_dir: PathLike, dest: DataDir) -> list[Path]:
    """Copy the tokenizers of `data_dir` into `dest`; the files copied."""
    return [f for src in tokenizer_entries(data_dir) for f in storage.copy(src, dest.root / src.name)]


def image_config(data_dir: PathLike, where: str = "data.dir") -> VQGANConfig | None:
    """The config of the image tokenizer of `data_dir` (None: it has none), without its
    weights."""
    path = DataDir(data_dir).image_tokenizer / CONFIG_FILE
    if not path.exists():
        return None
    try:
        cfg = build(VQGANConfig, json.loads(path.read_text()), "vqgan")
        cfg.check()
    except (ConfigError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: {path}: {e}") from None
    return cfg
