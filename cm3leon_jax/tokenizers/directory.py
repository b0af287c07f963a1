"""The text and image tokenizers of a directory: a prepared data directory or an export's
tokenizers/ (both use the names of `layout.DataDir`; local or cloud storage), checked
against a model's vocabulary.

Light on purpose: sampling and evaluation open tokenizers without the data pipeline.
"""

from __future__ import annotations

import dataclasses

from cm3leon_jax.config import ConfigError
from cm3leon_jax.layout import DataDir
from cm3leon_jax.storage import PathLike
from cm3leon_jax.tokenizers.image import ImageTokenizer
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class Tokenizers:
    """A model's text and image tokenizers and the vocabulary their ids live in."""
    text: TextTokenizer
    image: ImageTokenizer
    vocab: Vocab


def load_tokenizers(directory: PathLike, vocab: Vocab, batch_size: int = 32,
                    where: str = "tokenizers") -> Tokenizers:
    """The tokenizers of `directory`, refused unless every text piece and image code has
    its id in `vocab`. `where` names the config key the directory came from, for the
    errors."""
    d = DataDir(directory)
    for path in (d.text_tokenizer, d.image_tokenizer):
        if not path.exists():
            raise ConfigError(f"{where}: {path} does not exist (expected a prepared data "
                              "directory or an export's tokenizers/)")
    text = TextTokenizer.load(d.text_tokenizer)
    image = ImageTokenizer.load(d.image_tokenizer, batch_size)
    try:
        vocab.check_tokenizers(text.size, image.codebook_size)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Tokenizers(text, image, vocab)
