"""Sections `data` (the training input), `source`, `text_tokenizer` and `prepare` (what
`cm3leon prepare` reads and how it tokenizes it)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from cm3leon_jax.config.loader import ConfigError, fraction, nonnegative, positive


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: Optional[str] = None  # prepared data directory; null: the built-in synthetic source
    seq_len: int = 4096  # tokens per training row
    seed: int = 0  # data order, masking and packing draws
    # --- the prepared-data pipeline (data/pipeline.py); unused by the synthetic source ---
    k: int = 2  # retrieved documents in front of each query, drawn from its pool per read
    retrieved_dropout: float = 0.0  # probability each retrieved document is left out
    image_first: float = 0.0  # fraction of documents written image <break> caption
    cm3_lambda: float = 1.0  # Poisson mean of masked spans per example; 0: plain causal LM
    whole_segment: float = 0.0  # P(one span is a whole caption or image, chosen uniformly)
    packing: Literal["stream", "pack", "pad"] = "stream"  # rows of examples: see data/pipeline.py
    workers: int = 0  # grain mp_prefetch processes making examples; 0: in this process
    sentinel_weight: float = 1.0  # loss weight on predicting <mask:i> (metaseq 1, CM3 0)
    retrieved_weight: float = 1.0  # loss weight on retrieved documents (CM3Leon 1, RA-CM3 0.1)

    def check(self) -> None:
        positive("data", self, "seq_len")
        fraction("data", self, "retrieved_dropout", "image_first", "whole_segment")
        nonnegative("data", self, "k", "cm3_lambda", "workers", "sentinel_weight",
                    "retrieved_weight")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where `cm3leon prepare` reads image-caption pairs (cm3leon_jax/data/sources.py)."""
    kind: Literal["shapes", "fashion_mnist", "tfds", "jsonl",  # the reader
                  "webdataset", "parquet"] = "shapes"
    size: Optional[int] = 10000  # pairs: the first `size` records; null: all (not for shapes)
    seed: int = 0  # shapes: scene i depends on (seed, i)
    resolution: Optional[int] = None  # shapes: pixels per side; null: the image tokenizer's
    max_objects: int = 3  # shapes: 1..max_objects objects per scene (at most 9)
    names: int = 0  # shapes: > 0: scenes of this many named ones, captioned by name only
    zipf: float = 1.0  # shapes with names: how often each is shown falls as rank^-zipf
    name_jitter: bool = True  # shapes with names: each scene moves a name's objects within their cells; false: the same pixels every time
    path: Optional[str] = None  # IDX dir (fashion_mnist), file (jsonl), glob/{a..b} (webdataset, parquet)
    split: str = "train"  # fashion_mnist (train | test) and tfds split
    name: Optional[str] = None  # tfds builder name
    data_dir: Optional[str] = None  # tfds data directory (null: TFDS's default)
    image_key: Optional[str] = None  # tfds/jsonl/parquet image field; null: image (parquet: jpg)
    text_key: str = "caption"  # tfds feature / jsonl field / parquet column holding the caption

    def image_field(self) -> str:
        """`image_key`, its null resolved for the kind (the one place that does)."""
        if self.image_key is not None:
            return self.image_key
        return "jpg" if self.kind == "parquet" else "image"

    def check(self) -> None:
        positive("source", self, "size", "resolution")
        if self.kind == "shapes":
            if self.size is None:
                raise ConfigError("source.size: the shapes source is endless, give a number "
                                  "of pairs")
            if self.resolution is not None and self.resolution < 24:
                raise ConfigError(f"source.resolution={self.resolution}: shapes needs >= 24 "
                                  "pixels")
            if not 1 <= self.max_objects <= 9:
                raise ConfigError(f"source.max_objects={self.max_objects} must be in [1, 9]")
        nonnegative("source", self, "names", "zipf")
        if not self.name_jitter and not self.names:
            raise ConfigError("source.name_jitter=false: it fixes where named scenes place "
                              "their objects, and source.names is 0 (no named scenes)")
        if self.names and self.kind != "shapes":
            raise ConfigError(f"source.names={self.names}: named scenes are the shapes "
                              f"world's; source.kind is {self.kind!r}")
        if self.kind == "fashion_mnist" and self.split not in ("train", "test"):
            raise ConfigError(f"source.split={self.split!r}: fashion_mnist has train and test")
        if self.kind == "tfds" and not self.name:
            raise ConfigError("source.name: the tfds source needs a builder name")
        if self.kind == "jsonl" and not self.path:
            raise ConfigError("source.path: the jsonl source needs the .jsonl file")
        if self.kind in ("webdataset", "parquet") and not self.path:
            raise ConfigError(f"source.path: the {self.kind} source needs its files, a glob or "
                              "brace pattern such as shards/{00000..00099}."
                              + ("tar" if self.kind == "webdataset" else "parquet"))
        if self.kind == "parquet":
            for key, value in (("image_key", self.image_field()), ("text_key", self.text_key)):
                if not value.strip():
                    raise ConfigError(f"source.{key}: the parquet source needs a column name")
            if self.image_field() == self.text_key:
                null = "" if self.image_key is not None else " (null: jpg for parquet)"
                raise ConfigError(f"source.image_key{null} and source.text_key are both "
                                  f"{self.text_key!r}: name two columns")


@dataclasses.dataclass(frozen=True)
class TextTokenizerConfig:
    """Training of the sentencepiece model; its size is vocab.text_size (an upper bound)."""
    model_type: Literal["bpe", "unigram"] = "bpe"  # sentencepiece algorithm
    byte_fallback: bool = True  # unseen characters as UTF-8 bytes: every caption round-trips
    character_coverage: float = 1.0  # sentencepiece character_coverage
    train_captions: int = 1000000  # captions (evenly spaced over the source) to train on

    def check(self) -> None:
        positive("text_tokenizer", self, "train_captions")
        if not 0 < self.character_coverage <= 1:
            raise ConfigError(f"text_tokenizer.character_coverage={self.character_coverage} "
                              "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`cm3leon prepare`: source -> tokenizers -> document shards under data.dir."""
    text_tokenizer: Optional[str] = None  # a sentencepiece .model to use; null: train one
    image_tokenizer: Optional[str] = None  # an image tokenizer directory; null: train one
    workers: int = 2  # reader processes (0: read in this process)
    shard_size: int = 4096  # source records per shard
    batch_size: int = 32  # images per image-tokenizer call
    max_bad_fraction: float = 0.01  # fail when more of the records than this are skipped
    runner: Literal["local", "beam"] = "local"  # beam: shards written by Apache Beam workers
    beam_options: tuple[str, ...] = ()  # Beam pipeline flags, e.g. [--runner=DirectRunner, ...]

    def check(self) -> None:
        positive("prepare", self, "shard_size", "batch_size")
        for flag in self.beam_options:
            if not flag.startswith("--"):
                raise ConfigError(f"prepare.beam_options: {flag!r} is not a pipeline flag "
                                  "(--name=value)")
        if self.beam_options and self.runner != "beam":
            raise ConfigError("prepare.beam_options are set but prepare.runner is "
                              f"{self.runner!r}; set prepare.runner=beam")
        if self.workers < 0:
            raise ConfigError(f"prepare.workers={self.workers} must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"prepare.max_bad_fraction={self.max_bad_fraction} must be in "
                              "[0, 1]")
