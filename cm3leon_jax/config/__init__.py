"""The run config: one frozen dataclass per YAML section, loaded from YAML plus
`section.key=value` overrides and checked when loaded.

Each section lives in its own module of this package with its own checks (`model.py`,
`data.py`, ...); the loader (`loader.py`) is generic. This module composes the sections
into `Config` and adds the checks that span sections (a sequence longer than the position
table, a batch the mesh cannot split). Nothing here imports a stage of the flow, so every
stage can import it. Every error names the key: `model.n_heads=7 does not divide
model.d_model=64`. `cm3leon config keys` lists every key with its meaning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from cm3leon_jax import storage

from cm3leon_jax.config import sweep
from cm3leon_jax.config.data import DataConfig, PrepareConfig, SourceConfig, TextTokenizerConfig
from cm3leon_jax.config.demo import DemoConfig
from cm3leon_jax.config.generate import GenerateConfig
from cm3leon_jax.config.loader import (ConfigError, apply_overrides, build, dump_yaml, migrate,
                                       read_yaml)
from cm3leon_jax.config.model import (SPLASH_BLOCK, SPLASH_MIN_BLOCK, MeshConfig, ModelConfig,
                                      VocabConfig)
from cm3leon_jax.config.retrieval import RetrievalConfig
from cm3leon_jax.config.sft import SFTConfig
from cm3leon_jax.config.sweep import SweepConfig, SweepSize
from cm3leon_jax.config.train import FaultConfig, OptimizerConfig, TrainConfig
from cm3leon_jax.config.vqgan import VQGANConfig, VQGANTrainConfig

__all__ = [
    "Config", "ConfigError", "DataConfig", "DemoConfig", "FaultConfig", "GenerateConfig",
    "MeshConfig", "ModelConfig", "OptimizerConfig", "PrepareConfig", "RetrievalConfig",
    "SFTConfig", "SourceConfig", "SweepConfig", "SweepSize", "TextTokenizerConfig",
    "TrainConfig", "VQGANConfig", "VQGANTrainConfig", "VocabConfig", "from_dict",
    "load_config", "save_config", "validate",
]


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: VocabConfig = VocabConfig()  # the unified vocabulary
    model: ModelConfig = ModelConfig()  # the decoder
    mesh: MeshConfig = MeshConfig()  # the device mesh
    optimizer: OptimizerConfig = OptimizerConfig()  # AdamW and its schedule
    data: DataConfig = DataConfig()  # the training input
    train: TrainConfig = TrainConfig()  # the training run
    generate: GenerateConfig = GenerateConfig()  # sampling and guidance
    fault: FaultConfig = FaultConfig()  # bad steps
    retrieval: RetrievalConfig = RetrievalConfig()  # encoder, index, neighbors
    source: SourceConfig = SourceConfig()  # what `cm3leon prepare` reads
    text_tokenizer: TextTokenizerConfig = TextTokenizerConfig()  # sentencepiece training
    prepare: PrepareConfig = PrepareConfig()  # `cm3leon prepare`
    vqgan: VQGANConfig = VQGANConfig()  # the image tokenizer's shape
    vqgan_train: VQGANTrainConfig = VQGANTrainConfig()  # the image tokenizer's training
    sft: SFTConfig = SFTConfig()  # supervised fine-tuning
    sweep: SweepConfig = SweepConfig()  # scaling sweeps
    demo: DemoConfig = DemoConfig()  # `cm3leon demo`

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved config (multi-process agreement checks)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# Keys that were replaced, and by what: run directories and checkpoints written before load
# with the old value moved to the new key; an error only when both are set and differ.
RENAMED_KEYS = {("data", "retrieval_dir"): ("retrieval", "dir"),
                ("data", "rotation"): ("data", "whole_segment"),
                ("retrieval", "k"): ("retrieval", "pool"),
                ("retrieval", "max_score"): ("retrieval", "max_text_score"),
                ("sweep", "eval_dir"): ("train", "eval_dir"),
                ("sweep", "eval_batches"): ("train", "eval_batches")}
# Keys that no longer exist, and why. A run directory or export written before the removal
# loads without them; a config a person writes that still has one is refused.
REMOVED_KEYS = {
    ("sft", "enabled"): "`cm3leon sft` trains on the SFT mixture (the trainer takes its "
                        "batches from the command); delete the key",
    ("retrieval", "max_pair_score"): "duplicates among the chosen neighbors follow the same "
                                     "rule as duplicates of the document (retrieval."
                                     "max_text_score, retrieval.max_image_score); delete the key",
}


def from_dict(raw: dict, saved: bool = False) -> Config:
    """A Config from a mapping of sections: a YAML file's, or (`saved`) one written with a
    run or an export."""
    raw = migrate(raw, RENAMED_KEYS)
    for (section, key), why in REMOVED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            if not saved:
                raise ConfigError(f"{section}.{key} was removed: {why}")
            raw = {**raw, section: {k: v for k, v in raw[section].items() if k != key}}
    return build(Config, raw)


SHIPPED = Path(__file__).resolve().parents[1] / "configs"  # installed with the package


def config_file(path: storage.PathLike) -> storage.Path:
    """`path` (local or a URL), else the shipped config it names (`configs/tiny.yaml`
    works anywhere)."""
    if storage.is_remote(path) or storage.path(path).exists():
        return storage.path(path)
    path = Path(path)
    name = path.relative_to("configs") if path.parts[:1] == ("configs",) else path
    if not path.is_absolute() and (SHIPPED / name).is_file():
        return SHIPPED / name
    shipped = sorted(str(p.relative_to(SHIPPED)) for p in SHIPPED.rglob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist (shipped configs: "
                      f"{', '.join(shipped)})")


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                num_devices: int | None = None) -> Config:
    """YAML file (or the defaults) + `section.key=value` overrides, validated.

    With `num_devices`, the mesh and the batch are also checked against that many devices.
    """
    raw = read_yaml(config_file(path)) if path is not None else {}
    cfg = from_dict(apply_overrides(raw, list(overrides)))
    validate(cfg, num_devices)
    return cfg


def save_config(cfg: Config, path: storage.PathLike) -> None:
    storage.write_text_atomic(path, dump_yaml(cfg))


def validate(cfg: Config, num_devices: int | None = None) -> None:
    """Every section's own checks, then the checks across sections (and, with
    `num_devices`, against a mesh of that many devices)."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).check()
    m, o, t, d = cfg.model, cfg.optimizer, cfg.train, cfg.data
    o.check_length(o.decay_steps or t.steps)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.logits_chunk and d.seq_len % m.logits_chunk:
        raise ConfigError(f"model.logits_chunk={m.logits_chunk} does not divide "
                          f"data.seq_len={d.seq_len}")
    if m.attention == "splash" and (d.seq_len % SPLASH_MIN_BLOCK or (
            d.seq_len > SPLASH_BLOCK and d.seq_len % SPLASH_BLOCK)):
        raise ConfigError(f"model.attention=splash needs data.seq_len (got {d.seq_len}) to be a "
                          f"multiple of {SPLASH_MIN_BLOCK}, and of {SPLASH_BLOCK} above "
                          f"{SPLASH_BLOCK} (its blocks); pad the rows or use model.attention=xla")
    if d.k > cfg.retrieval.pool:
        raise ConfigError(f"data.k={d.k} exceeds retrieval.pool={cfg.retrieval.pool}: the "
                          "draws come from each document's pool; raise retrieval.pool")
    if t.eval_every and d.dir is not None and t.eval_dir is None:
        raise ConfigError(f"train.eval_every={t.eval_every} with data.dir={d.dir!r}: set "
                          "train.eval_dir to prepared held-out data (`cm3leon prepare` of "
                          "documents training never sees)")
    if t.eval_dir is not None and d.dir is None:
        raise ConfigError(f"train.eval_dir={t.eval_dir!r} is set but data.dir is null: the "
                          "synthetic source holds out its own rows; set data.dir or drop "
                          "train.eval_dir")
    g = cfg.generate
    if g.image_tokens is not None and g.image_tokens + 2 > m.max_seq_len:
        raise ConfigError(f"generate.image_tokens={g.image_tokens} does not fit "
                          f"model.max_seq_len={m.max_seq_len} with its prompt")
    if cfg.text_tokenizer.byte_fallback and cfg.vocab.text_size < 300:
        raise ConfigError(f"vocab.text_size={cfg.vocab.text_size}: byte fallback needs >= 300 "
                          "text ids (256 bytes + characters); or "
                          "text_tokenizer.byte_fallback=false")
    if num_devices is not None:
        _check_devices(cfg, num_devices)
    if cfg.sweep != SweepConfig():
        for where, run in sweep.check_sizes(cfg):
            try:
                validate(run, num_devices)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


def _check_devices(cfg: Config, num_devices: int) -> None:
    m, t = cfg.model, cfg.train
    data, fsdp, tensor = cfg.mesh.shape(num_devices)
    micro = t.batch_size // t.grad_accum
    if micro % (data * fsdp):
        raise ConfigError(
            f"train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} = {micro} "
            f"sequences per micro-batch is not divisible by the data-parallel size "
            f"mesh.data x mesh.fsdp = {data * fsdp}")
    shards = {"model.n_heads": m.n_heads, "model.d_ff": m.d_ff,
              "vocab size": cfg.vocab.build().size}
    for key, value in shards.items():
        if value % tensor:
            raise ConfigError(f"{key}={value} is not divisible by mesh.tensor={tensor}")
    if m.d_model % fsdp:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}")
