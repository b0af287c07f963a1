"""Which files of a prepared data directory an export carries: its tokenizers.

An export must be enough to rebuild and sample the model, so it takes the text tokenizer,
the image tokenizer, the vocabulary and the manifest of the run's `data.dir` (the entries
`layout.DataDir.tokenizer_entries` names), into `EXPORT/tokenizers/` under the same names,
so the export's tokenizers open like a prepared directory's. Training artefacts (the image
tokenizer's training run, the documents) stay behind. Either side may be on cloud storage
(storage.py).
"""

from __future__ import annotations


from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import Path, PathLike


def tokenizer_entries(data_dir: PathLike, where: str = "data.dir") -> list[Path]:
    data = DataDir(data_dir)
    if not data.root.is_dir():
        raise ConfigError(f"{where}: {str(data.root)!r} does not exist here, so its tokenizers "
                          "cannot be exported (pass --skip-tokenizers to export weights only)")
    return [p for p in data.tokenizer_entries() if p.exists()]


def copy_tokenizers(data_dir: PathLike, dest: DataDir) -> list[Path]:
    """Copy the tokenizer entries of `data_dir` into `dest`; the files copied."""
    return [f for src in tokenizer_entries(data_dir) for f in storage.copy(src, dest.root / src.name)]
