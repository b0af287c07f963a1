"""Which files of a prepared data directory an export carries: its tokenizers.

An export must be enough to rebuild and sample the model, so it takes the text tokenizer,
the image tokenizer, the vocabulary and the manifest of the run's `data.dir` (the entries
`layout.DataDir.tokenizer_entries` names), into `EXPORT/tokenizers/` under the same names,
so the export's tokenizers open like a prepared directory's. Training artefacts (the image
tokenizer's training run, the documents) stay behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cm3leon_jax.config import ConfigError
from cm3leon_jax.layout import DataDir


def tokenizer_entries(data_dir: str | Path, where: str = "data.dir") -> list[Path]:
    data = DataDir(Path(data_dir))
    if not data.root.is_dir():
        raise ConfigError(f"{where}: {str(data.root)!r} does not exist here, so its tokenizers "
                          "cannot be exported (pass --skip-tokenizers to export weights only)")
    return [p for p in data.tokenizer_entries() if p.exists()]


def copy_tokenizers(data_dir: str | Path, dest: DataDir) -> list[Path]:
    """Copy the tokenizer entries of `data_dir` into `dest`; the files copied."""
    copied = []
    for src in tokenizer_entries(data_dir):
        dest.root.mkdir(parents=True, exist_ok=True)
        target = dest.root / src.name
        if src.is_dir():
            shutil.copytree(src, target)
            copied += sorted(p for p in target.rglob("*") if p.is_file())
        else:
            shutil.copy2(src, target)
            copied.append(target)
    return copied
