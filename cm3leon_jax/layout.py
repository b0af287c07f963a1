"""What is where on disk: the entries of a run directory, a prepared data directory, a
retrieval directory and an export, each name spelled once, here.

    RUN/         checkpoints/  config.yaml  metrics.jsonl  tensorboard/  samples/  wandb_id
    DATA/        manifest.json  vocab.json  text_tokenizer.model  image_tokenizer/
                 image_tokenizer_training/  documents/  skipped.jsonl  .inputs.json  retrieval/
    RETRIEVAL/   encoder/  bank/  index/  queries/  shards/  neighbors.npy  scores.npy
                 manifest.json
    EXPORT/      model.safetensors  config.json  vocab.json  tokenizers/  cm3leon_export.json
                 (hf-opt: model[-0000k-of-0000N].safetensors  model.safetensors.index.json
                 generation_config.json  tokenizer.json  tokenizer_config.json  README.md)
    DEMO/        data/ (a DATA)  run/ (a RUN)  evaluation.json  report.json  report.md
                 image_tokenizer_build/ (a DATA: the demo's tokenizer, trained once)
                 loss.png  samples.png  ablation/ (k{K}/ RUNs, ablation.json|md|png)

`tokenizers/` of an export holds the two tokenizers of DATA under the same names, so a
`DataDir` of either opens them. Files private to one module (a tokenizer's weights, the
ScaNN index files, a sweep's bookkeeping) are named in that module.
"""

from __future__ import annotations

import dataclasses
from cm3leon_jax import storage
from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.storage import Path, PathLike


class _Dir:
    """A directory layout rooted at a user path (local or a URL: storage.py)."""

    def __post_init__(self):
        object.__setattr__(self, "root", storage.path(self.root))


@dataclasses.dataclass(frozen=True)
class RunDir(_Dir):
    """`cm3leon train` / `sft` output: checkpoints (state + data iterator + config), logs."""
    root: Path

    checkpoints = property(lambda self: self.root / "checkpoints")
    config = property(lambda self: self.root / "config.yaml")  # the resolved config, readable
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    wandb_id = property(lambda self: self.root / "wandb_id")  # train.trackers wandb: resumed by id
    samples = property(lambda self: self.root / "samples")
    profile = property(lambda self: self.root / "profile")  # train.profile_steps traces
    lock = property(lambda self: self.root / ".lock")  # one trainer at a time (train/lock.py)

    def metrics_before_restart(self, n: int) -> Path:
        """Where the n-th `train.allow_restart` keeps the metrics of the run it abandons."""
        return self.root / f"metrics.before-restart-{n}.jsonl"


def is_run(path: PathLike) -> bool:
    return RunDir(path).checkpoints.is_dir()


@dataclasses.dataclass(frozen=True)
class DataDir(_Dir):
    """`cm3leon prepare` output: tokenizers, vocabulary and document shards."""
    root: Path

    manifest = property(lambda self: self.root / "manifest.json")  # written last
    vocab = property(lambda self: self.root / "vocab.json")
    text_tokenizer = property(lambda self: self.root / "text_tokenizer.model")
    image_tokenizer = property(lambda self: self.root / "image_tokenizer")
    image_tokenizer_training = property(lambda self: self.root / "image_tokenizer_training")
    documents = property(lambda self: self.root / "documents")
    skipped = property(lambda self: self.root / "skipped.jsonl")
    inputs = property(lambda self: self.root / ".inputs.json")  # what it is prepared from
    retrieval = property(lambda self: self.root / "retrieval")  # the default retrieval dir


@dataclasses.dataclass(frozen=True)
class RetrievalDir(_Dir):
    """`cm3leon retrieval train-encoder`, `index` and `neighbors` output."""
    root: Path

    encoder = property(lambda self: self.root / "encoder")
    bank = property(lambda self: self.root / "bank")  # the memory bank's vectors
    index = property(lambda self: self.root / "index")  # the serialized ScaNN searcher
    queries = property(lambda self: self.root / "queries")  # resumable query embeddings
    shards = property(lambda self: self.root / "shards")  # neighbors of document ranges
    neighbors = property(lambda self: self.root / "neighbors.npy")  # read by training
    scores = property(lambda self: self.root / "scores.npy")
    manifest = property(lambda self: self.root / "manifest.json")


@dataclasses.dataclass(frozen=True)
class ExportDir(_Dir):
    """`cm3leon export` output."""
    root: Path

    weights = property(lambda self: self.root / "model.safetensors")
    config = property(lambda self: self.root / "config.json")
    provenance = property(lambda self: self.root / "cm3leon_export.json")  # hf-opt only
    vocab = property(lambda self: self.root / "vocab.json")
    tokenizers = property(lambda self: DataDir(self.root / "tokenizers"))


@dataclasses.dataclass(frozen=True)
class DemoDir(_Dir):
    """`cm3leon demo` output: every stage of the flow under one directory."""
    root: Path

    data = property(lambda self: DataDir(self.root / "data"))
    heldout = property(lambda self: DataDir(self.root / "heldout"))  # train.eval_dir
    tokenizer_build = property(lambda self: DataDir(self.root / "image_tokenizer_build"))
    run = property(lambda self: RunDir(self.root / "run"))
    evaluation = property(lambda self: self.root / "evaluation.json")  # reused while unchanged
    report_json = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    loss_png = property(lambda self: self.root / "loss.png")
    samples_png = property(lambda self: self.root / "samples.png")
    ablation = property(lambda self: self.root / "ablation")  # `cm3leon ablate-retrieval`

    def ablation_run(self, k: int) -> RunDir:
        """The ablation's run trained with data.k = k (the demo's own k is `run`)."""
        return RunDir(self.root / "ablation" / f"k{k}")


def data_dir(cfg: Config) -> DataDir:
    if not cfg.data.dir:
        raise ConfigError("data.dir is not set: this needs a prepared data directory "
                          "(cm3leon prepare)")
    return DataDir(cfg.data.dir)


def bank_dir(cfg: Config) -> Path:
    """The memory bank's prepared directory: `retrieval.bank`, else `data.dir` itself."""
    return storage.path(cfg.retrieval.bank) if cfg.retrieval.bank else data_dir(cfg).root


def retrieval_dir(cfg: Config) -> RetrievalDir:
    """`retrieval.dir`, else `<data.dir>/retrieval`."""
    if cfg.retrieval.dir:
        return RetrievalDir(cfg.retrieval.dir)
    return RetrievalDir(data_dir(cfg).retrieval)
