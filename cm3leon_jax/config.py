"""Typed configs: plain frozen dataclasses, loaded from YAML plus `key=value` overrides.

Every value is checked when loaded: unknown keys, wrong types and impossible shapes fail
with a message that names the key (`model.n_heads=7 does not divide model.d_model=64`).
The README documents every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cm3leon_jax.vocab import Vocab


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible."""


@dataclasses.dataclass(frozen=True)
class VocabConfig:
    text_size: int = 56320  # sentencepiece pieces
    image_size: int = 8192  # VQ codebook entries
    num_sentinels: int = 512  # <mask:i> tokens for CM3 spans

    def build(self) -> Vocab:
        return Vocab(self.text_size, self.image_size, self.num_sentinels)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 16
    d_ff: int = 4096
    max_seq_len: int = 4096  # rows of the learned position table
    activation: Literal["relu", "gelu"] = "relu"
    tie_embeddings: bool = True
    qk_norm: bool = False  # Chameleon: LayerNorm on queries and keys
    swin_norm: bool = False  # Chameleon: x + norm(f(x)) instead of x + f(norm(x))
    z_loss: float = 0.0  # Chameleon: 1e-5 * log^2 Z; 0 disables
    init_std: float = 0.006  # truncated normal at +-3 std
    pos_init_std: float = 0.0002
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype; params stay float32
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "full"
    logits_chunk: int = 0  # >0: compute the loss over sequence chunks of this many tokens

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all devices left over
    tensor: int = 1

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


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 6e-4  # peak learning rate
    warmup_steps: int = 100  # linear from 0; the paper uses 1500 of a much longer run
    decay_steps: Optional[int] = None  # schedule length; null: train.steps
    final_lr_ratio: float = 0.1  # linear decay to this fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: Optional[str] = None  # prepared data directory; null: the built-in synthetic source
    seq_len: int = 4096
    seed: int = 0  # data order
    # --- the prepared-data pipeline (data/pipeline.py); unused by the synthetic source ---
    k: int = 2  # retrieved documents in front of each query (<= the table's columns)
    retrieved_dropout: float = 0.0  # probability each retrieved document is left out
    image_first: float = 0.0  # fraction of documents written image <break> caption
    cm3_lambda: float = 1.0  # Poisson mean of masked spans per example; 0: plain causal LM
    rotation: float = 0.0  # probability a masked span grows to its whole segment
    packing: Literal["pack", "pad"] = "pack"  # first-fit packing, or one example per row
    workers: int = 0  # grain mp_prefetch processes making examples; 0: in this process
    sentinel_weight: float = 1.0  # loss weight on predicting <mask:i> (metaseq 1, CM3 0)
    retrieved_weight: float = 1.0  # loss weight on retrieved documents (CM3Leon 1, RA-CM3 0.1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # total optimizer updates of the run
    batch_size: int = 2048  # global sequences per update
    grad_accum: int = 1  # micro-batches per update
    seed: int = 0  # parameter init
    log_every: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    peak_tflops: Optional[float] = None  # per device, for MFU; null: known devices only
    init_from: Optional[str] = None  # export or run dir: a fresh run starts from its weights


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k best tokens; 0: off
    top_p: float = 0.9  # nucleus; 1.0: off
    cfg_scale: float = 3.0  # alpha_c in uncond + alpha_c (cond - uncond); 1.0: no guidance
    image_cfg_scale: float = 1.5  # two-scale guidance (image + text conditioned generation)
    text_cfg_scale: float = 7.5
    cd_alpha: float = 0.1  # CD-K head: p_cond >= cd_alpha * (k-th largest p_cond)
    cd_k: int = 5
    cd_sample: bool = True  # sample from the CD-K scores; false: take the best
    pool: Literal["topp", "cdk", "mixed"] = "topp"  # how image candidates are drawn
    candidates: int = 1  # candidates per output image, reranked when > 1 (needs a scorer)
    image_tokens: Optional[int] = None  # tokens per image; null: from the image tokenizer
    max_text_tokens: int = 32  # longest caption / infill
    min_text_tokens: int = 0  # captions / infills / answers: at least this many text pieces
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    max_bad_steps: int = 5  # stop when more than this many updates in a row are skipped
    debug_nan_steps: tuple[int, ...] = ()  # test hook: these steps get NaN gradients
    log_example_ids: bool = False  # write each step's global example ids to metrics.jsonl


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    dir: Optional[str] = None  # encoder, index, neighbors.npy (read by training); null: <data.dir>/retrieval
    bank: Optional[str] = None  # memory-bank prepared directory; null: data.dir itself
    encoder: Literal["builtin", "minilm", "npy"] = "builtin"
    embeddings: str = "embeddings"  # npy encoder: <prepared dir>/<this>/{text,image}.npy
    embed_batch: int = 256  # documents per encoder call
    exact_threshold: int = 20000  # banks smaller than this are searched exactly
    num_leaves: int = 0  # ScaNN tree leaves; 0: about sqrt(bank size)
    leaves_to_search: int = 32
    reorder: int = 100  # candidates rescored exactly after asymmetric hashing
    recall_queries: int = 1000  # sample size for the index's recall@10 report
    k: int = 2  # neighbors kept per document
    candidates: int = 32  # top candidates searched before the heuristics
    query: Literal["text", "image", "both"] = "both"  # what of a document forms its query
    query_text_dropout: float = 0.2  # fraction of the query's text tokens dropped
    max_score: float = 0.9  # skip candidates scoring above this against the query
    max_pair_score: float = 0.9  # skip candidates scoring above this against a chosen one
    prefer_pairs: bool = True  # documents with both modalities before single-modality ones
    seed: int = 0  # query dropout
    # the built-in dual encoder
    embed_dim: int = 128
    width: int = 128
    text_layers: int = 2
    train_steps: int = 1000
    train_batch_size: int = 64
    train_lr: float = 1e-3
    temperature: float = 0.05
    train_text_dropout: float = 0.2  # half the training texts lose this fraction of tokens


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where `cm3leon prepare` reads image-caption pairs (cm3leon_jax/data/sources.py)."""
    kind: Literal["shapes", "fashion_mnist", "tfds", "jsonl"] = "shapes"
    size: Optional[int] = 10000  # pairs: the first `size` records; null: all (not for shapes)
    seed: int = 0  # shapes: scene i depends on (seed, i)
    resolution: Optional[int] = None  # shapes: pixels per side; null: the image tokenizer's
    max_objects: int = 3  # shapes: 1..max_objects objects per scene (at most 9)
    path: Optional[str] = None  # fashion_mnist: IDX directory (null: Debian's); jsonl: the file
    split: str = "train"  # fashion_mnist (train | test) and tfds split
    name: Optional[str] = None  # tfds builder name
    data_dir: Optional[str] = None  # tfds data directory (null: TFDS's default)
    image_key: str = "image"  # tfds feature / jsonl field holding the image (path)
    text_key: str = "caption"  # tfds feature / jsonl field holding the caption


@dataclasses.dataclass(frozen=True)
class TextTokenizerConfig:
    """Training of the sentencepiece model; its size is vocab.text_size (an upper bound)."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True  # unseen characters as UTF-8 bytes: every caption round-trips
    character_coverage: float = 1.0
    train_captions: int = 1000000  # captions (evenly spaced over the source) to train on


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`cm3leon prepare`: source -> tokenizers -> document shards under data.dir."""
    text_tokenizer: Optional[str] = None  # a sentencepiece .model to use; null: train one
    image_tokenizer: Optional[str] = None  # an image tokenizer directory; null: train one
    workers: int = 2  # reader processes (0: read in this process)
    shard_size: int = 4096  # source records per shard
    batch_size: int = 32  # images per image-tokenizer call
    max_bad_fraction: float = 0.01  # fail when more of the records than this are skipped


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The image tokenizer's shape (taming/Chameleon VQ-GAN); the model is model/vqgan.py."""
    resolution: int = 256  # input images are resolution x resolution RGB
    base_channels: int = 128  # taming `ch`
    channel_mult: tuple[int, ...] = (1, 1, 2, 4)  # one level each; len-1 stride-2 downsamples
    num_res_blocks: int = 2  # per encoder level (the decoder has one more, as taming)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes that get attention blocks
    mid_attn: bool = True  # attention in the middle block (Chameleon attn_type "vanilla")
    norm_groups: int = 32  # GroupNorm groups (eps 1e-6, as taming)
    z_channels: int = 256  # encoder output channels (Chameleon latent_channels)
    embed_dim: int = 256  # codebook vector size (after quant_conv)
    codebook_size: int = 8192

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size ** 2


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig:
    """`cm3leon tokenizer train-image`: images from the shapes source, Adam, fixed LR."""
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-4
    b1: float = 0.5
    b2: float = 0.9
    recon_loss: Literal["l1", "l2"] = "l1"
    beta: float = 0.25  # commitment weight
    codebook_weight: float = 1.0
    restart_every: int = 100  # re-seed codes unused for this many steps from encoder outputs; 0: never
    disc_weight: float = 0.0  # patch-GAN generator loss weight; 0: no discriminator
    disc_start: int = 0  # step at which the GAN losses switch on
    disc_channels: int = 64
    disc_layers: int = 3
    images: int = 20000  # training images drawn from the shapes source
    eval_images: int = 512  # held-out images for the final PSNR and codebook usage
    seed: int = 0  # init, image draw and batch order
    log_every: int = 50


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning data (cm3leon_jax/data/sft_*.py): tasks, sources, mixture."""
    source: Literal["shapes", "jsonl"] = "shapes"  # the built-in suite or JSONL files
    tasks: tuple[str, ...] = ("caption", "vqa", "edit", "grounding", "control")
    sizes: tuple[int, ...] = (2000, 4000, 2000, 2000, 2000)  # shapes: train examples per task
    files: tuple[str, ...] = ()  # jsonl: SFT files (records carry their task)
    weights: tuple[float, ...] = ()  # wanted share per task (tasks order); empty: uniform
    max_ratio: float = 3.0  # up-sampling bound (CM3Leon App. E.1)
    min_ratio: float = 0.3  # down-sampling bound
    seed: int = 0  # shapes scenes, phrasings and the mixture draws
    resolution: Optional[int] = None  # shapes: pixels per side; null: the image tokenizer's
    max_objects: int = 3  # shapes: 1..max_objects objects per scene
    # --- training on the mixture (cm3leon sft; data/sft_batches.py) ---
    enabled: bool = False  # train on the SFT mixture instead of data.dir / synthetic rows
    loss: Literal["cm3", "response"] = "cm3"  # CM3 objective (CM3Leon) or response only (Chameleon)
    tokenizers: Optional[str] = None  # dir with text_tokenizer.model, image_tokenizer/; null: the init's
    eval_examples: int = 64  # cm3leon eval-sft: held-out shapes examples per task


@dataclasses.dataclass(frozen=True)
class SweepSize:
    """One model of a scaling sweep: its shape (over the `model` section) and its LR."""
    name: str  # the run's directory under the sweep's runs directory
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    lr: Optional[float] = None  # peak learning rate; null: optimizer.lr


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """`cm3leon sweep`: a family of sizes trained on the same data (scaling/plan.py)."""
    sizes: tuple[SweepSize, ...] = ()  # empty: not a sweep config
    tokens_per_param: float = 20.0  # training tokens = this x non-embedding parameters
    evals_per_decade: int = 4  # evaluate when training FLOPs cross 10^(k/this)
    eval_batches: int = 4  # held-out batches of train.batch_size rows
    eval_dir: Optional[str] = None  # prepared held-out data; required with data.dir


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`cm3leon demo`: evaluation on held-out shapes scenes (indices after source.size)."""
    eval_scenes: int = 64  # held-out captions (text -> image) and images (image -> text)
    grid_rows: int = 8  # captions shown in each sample grid


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: VocabConfig = VocabConfig()
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    fault: FaultConfig = FaultConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    source: SourceConfig = SourceConfig()
    text_tokenizer: TextTokenizerConfig = TextTokenizerConfig()
    prepare: PrepareConfig = PrepareConfig()
    vqgan: VQGANConfig = VQGANConfig()
    vqgan_train: VQGANTrainConfig = VQGANTrainConfig()
    sft: SFTConfig = SFTConfig()
    sweep: SweepConfig = SweepConfig()
    demo: DemoConfig = DemoConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved config (multi-process agreement checks)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --- loading -------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] = (),
                num_devices: int | None = None) -> Config:
    """YAML file (or the defaults) + `section.key=value` overrides, validated.

    With `num_devices`, the mesh and the batch are also checked against that many devices.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        section, _, field = key.partition(".")
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    cfg = from_dict(raw)
    validate(cfg, num_devices)
    return cfg


# Keys that were replaced, and by what: run directories and checkpoints written before load
# with the old value moved to the new key; an error only when both are set and differ.
RENAMED_KEYS = {("data", "retrieval_dir"): ("retrieval", "dir")}


def from_dict(raw: dict) -> Config:
    for (section, key), (new_section, new_key) in RENAMED_KEYS.items():
        values = raw.get(section)
        if not (isinstance(values, dict) and key in values):
            continue
        old = values[key]
        raw = {**raw, section: {k: v for k, v in values.items() if k != key}}
        if old is None:
            continue
        target = raw.get(new_section)
        target = dict(target) if isinstance(target, dict) else {}
        if target.get(new_key) not in (None, old):
            raise ConfigError(f"{section}.{key}={old!r} (the old name of {new_section}.{new_key}) "
                              f"and {new_section}.{new_key}={target[new_key]!r} disagree")
        raw = {**raw, new_section: {**target, new_key: old}}
    return _build(Config, raw, "")


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str):
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(typ)
        if dataclasses.is_dataclass(inner):
            required = [f.name for f in dataclasses.fields(inner)
                        if f.default is dataclasses.MISSING]
            for i, item in enumerate(value):
                missing = [n for n in required if isinstance(item, dict) and n not in item]
                if missing:
                    raise ConfigError(f"{key}[{i}]: missing key {missing[0]!r} "
                                      f"(required: {', '.join(required)})")
        return tuple(_coerce(item, inner, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 6e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"{key}: unsupported config type {typ}")


def _positive(cfg: Config, *keys: str):
    for key in keys:
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")


def validate(cfg: Config, num_devices: int | None = None) -> None:
    m, o, t, d = cfg.model, cfg.optimizer, cfg.train, cfg.data
    _positive(cfg, "model.n_layers", "model.d_model", "model.n_heads", "model.d_ff",
              "model.max_seq_len", "model.init_std", "model.pos_init_std", "data.seq_len",
              "optimizer.lr", "optimizer.b1", "optimizer.b2", "optimizer.eps",
              "optimizer.decay_steps", "train.steps", "train.batch_size", "train.grad_accum",
              "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
              "train.peak_tflops")
    _nonnegative = {"model.z_loss": m.z_loss, "model.logits_chunk": m.logits_chunk,
                    "optimizer.warmup_steps": o.warmup_steps,
                    "optimizer.weight_decay": o.weight_decay, "optimizer.clip_norm": o.clip_norm}
    for key, value in _nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}")
    if not 0 <= o.final_lr_ratio <= 1:
        raise ConfigError(f"optimizer.final_lr_ratio={o.final_lr_ratio} must be in [0, 1]")
    if not (0 < o.b1 < 1 and 0 < o.b2 < 1):
        raise ConfigError(f"optimizer.b1={o.b1}, optimizer.b2={o.b2} must be in (0, 1)")
    decay = o.decay_steps or t.steps
    if o.warmup_steps > decay:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} exceeds the schedule "
                          f"length {decay} (optimizer.decay_steps or train.steps)")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.logits_chunk and d.seq_len % m.logits_chunk:
        raise ConfigError(f"model.logits_chunk={m.logits_chunk} does not divide "
                          f"data.seq_len={d.seq_len}")
    if t.init_from is not None and not t.init_from.strip():
        raise ConfigError("train.init_from must be an export directory or null")
    for key in ("retrieved_dropout", "image_first", "rotation"):
        if not 0 <= getattr(d, key) <= 1:
            raise ConfigError(f"data.{key}={getattr(d, key)} must be in [0, 1]")
    for key in ("k", "cm3_lambda", "workers", "sentinel_weight", "retrieved_weight"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}={getattr(d, key)} must be >= 0")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} does not divide "
                          f"train.batch_size={t.batch_size}")
    for name in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name}={v} must be a positive size or -1")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    _validate_generate(cfg)
    if cfg.fault.max_bad_steps < 0:
        raise ConfigError(f"fault.max_bad_steps={cfg.fault.max_bad_steps} must be >= 0")
    for s in cfg.fault.debug_nan_steps:
        if s <= 0:
            raise ConfigError(f"fault.debug_nan_steps contains {s}: steps count from 1")
    _validate_retrieval(cfg.retrieval)
    validate_vqgan(cfg.vqgan)
    _validate_vqgan_train(cfg.vqgan_train)
    try:
        vocab = cfg.vocab.build()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_prepare(cfg)
    _validate_sft(cfg.sft)
    for key in ("eval_scenes", "grid_rows"):
        if getattr(cfg.demo, key) < 1:
            raise ConfigError(f"demo.{key}={getattr(cfg.demo, key)} must be >= 1")
    if num_devices is not None:
        data, fsdp, tensor = cfg.mesh.shape(num_devices)
        micro = t.batch_size // t.grad_accum
        if micro % (data * fsdp):
            raise ConfigError(
                f"train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} = {micro} "
                f"sequences per micro-batch is not divisible by the data-parallel size "
                f"mesh.data x mesh.fsdp = {data * fsdp}")
        shards = {"model.n_heads": m.n_heads, "model.d_ff": m.d_ff, "vocab size": vocab.size}
        for key, value in shards.items():
            if value % tensor:
                raise ConfigError(f"{key}={value} is not divisible by mesh.tensor={tensor}")
        if m.d_model % fsdp:
            raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}")
    if cfg.sweep != SweepConfig():
        from cm3leon_jax.scaling.plan import check_sweep

        check_sweep(cfg, num_devices)


def _validate_retrieval(r: RetrievalConfig) -> None:
    for key in ("embed_batch", "exact_threshold", "leaves_to_search", "reorder",
                "recall_queries", "k", "candidates", "embed_dim", "width", "train_steps",
                "train_batch_size", "train_lr", "temperature"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"retrieval.{key}={getattr(r, key)} must be > 0")
    for key in ("num_leaves", "text_layers"):
        if getattr(r, key) < 0:
            raise ConfigError(f"retrieval.{key}={getattr(r, key)} must be >= 0")
    if r.candidates < r.k:
        raise ConfigError(f"retrieval.candidates={r.candidates} is below retrieval.k={r.k}")
    if r.candidates > r.reorder:
        raise ConfigError(f"retrieval.candidates={r.candidates} exceeds retrieval.reorder="
                          f"{r.reorder} (the candidates must come out of the exact rescoring)")
    if r.reorder < 10:
        raise ConfigError(f"retrieval.reorder={r.reorder} must be >= 10 (recall@10 is reported)")
    if not 0 <= r.query_text_dropout < 1:
        raise ConfigError(f"retrieval.query_text_dropout={r.query_text_dropout} must be in [0, 1)")
    if not 0 <= r.train_text_dropout < 1:
        raise ConfigError(f"retrieval.train_text_dropout={r.train_text_dropout} must be in [0, 1)")
    for key in ("max_score", "max_pair_score"):
        if not -1 <= getattr(r, key) <= 1:
            raise ConfigError(f"retrieval.{key}={getattr(r, key)} must be a cosine in [-1, 1]")
    if r.encoder == "minilm" and r.query == "image":
        raise ConfigError("retrieval.query=image needs an image encoder; retrieval.encoder=minilm "
                          "embeds text only")
    if r.encoder == "npy" and r.query_text_dropout and r.query != "image":
        raise ConfigError("retrieval.encoder=npy reads precomputed vectors and cannot drop query "
                          "tokens: set retrieval.query_text_dropout=0")
    if not r.embeddings or "/" in r.embeddings:
        raise ConfigError(f"retrieval.embeddings={r.embeddings!r} must be one directory name")
    if r.train_batch_size < 2:
        raise ConfigError("retrieval.train_batch_size must be >= 2 (contrastive negatives)")


def _validate_generate(cfg: Config) -> None:
    g = cfg.generate
    _positive(cfg, "generate.cfg_scale", "generate.cd_alpha", "generate.cd_k",
              "generate.candidates", "generate.image_tokens", "generate.max_text_tokens")
    for key, value in {"generate.temperature": g.temperature, "generate.top_k": g.top_k,
                       "generate.image_cfg_scale": g.image_cfg_scale,
                       "generate.text_cfg_scale": g.text_cfg_scale}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p} must be in (0, 1]")
    if not 0 <= g.min_text_tokens <= g.max_text_tokens:
        raise ConfigError(f"generate.min_text_tokens={g.min_text_tokens} must be in "
                          f"[0, generate.max_text_tokens={g.max_text_tokens}]")
    if g.cd_alpha > 1:
        raise ConfigError(f"generate.cd_alpha={g.cd_alpha} must be in (0, 1]")
    if g.pool == "mixed" and g.candidates < 2:
        raise ConfigError("generate.pool=mixed needs generate.candidates >= 2 "
                          f"(got {g.candidates}): half top-p, half CD-K")
    if g.image_tokens is not None and g.image_tokens + 2 > cfg.model.max_seq_len:
        raise ConfigError(f"generate.image_tokens={g.image_tokens} does not fit "
                          f"model.max_seq_len={cfg.model.max_seq_len} with its prompt")


def _validate_prepare(cfg: Config) -> None:
    src, tt, p = cfg.source, cfg.text_tokenizer, cfg.prepare
    _positive(cfg, "source.size", "source.resolution", "text_tokenizer.train_captions",
              "prepare.shard_size", "prepare.batch_size")
    if src.kind == "shapes":
        if src.size is None:
            raise ConfigError("source.size: the shapes source is endless, give a number of pairs")
        if src.resolution is not None and src.resolution < 24:
            raise ConfigError(f"source.resolution={src.resolution}: shapes needs >= 24 pixels")
        if not 1 <= src.max_objects <= 9:
            raise ConfigError(f"source.max_objects={src.max_objects} must be in [1, 9]")
    if src.kind == "fashion_mnist" and src.split not in ("train", "test"):
        raise ConfigError(f"source.split={src.split!r}: fashion_mnist has train and test")
    if src.kind == "tfds" and not src.name:
        raise ConfigError("source.name: the tfds source needs a builder name")
    if src.kind == "jsonl" and not src.path:
        raise ConfigError("source.path: the jsonl source needs the .jsonl file")
    if not 0 < tt.character_coverage <= 1:
        raise ConfigError(f"text_tokenizer.character_coverage={tt.character_coverage} "
                          "must be in (0, 1]")
    if tt.byte_fallback and cfg.vocab.text_size < 300:
        raise ConfigError(f"vocab.text_size={cfg.vocab.text_size}: byte fallback needs >= 300 "
                          "text ids (256 bytes + characters); or text_tokenizer.byte_fallback=false")
    if p.workers < 0:
        raise ConfigError(f"prepare.workers={p.workers} must be >= 0")
    if not 0 <= p.max_bad_fraction <= 1:
        raise ConfigError(f"prepare.max_bad_fraction={p.max_bad_fraction} must be in [0, 1]")


def _validate_sft(s: SFTConfig) -> None:
    from cm3leon_jax.data.sft_tasks import TASKS

    if not s.tasks:
        raise ConfigError("sft.tasks: give at least one task")
    for task in s.tasks:
        if task not in TASKS:
            raise ConfigError(f"sft.tasks: {task!r} is not one of {list(TASKS)}")
    if len(set(s.tasks)) != len(s.tasks):
        raise ConfigError(f"sft.tasks={list(s.tasks)} names a task twice")
    if s.source == "shapes":
        if len(s.sizes) != len(s.tasks):
            raise ConfigError(f"sft.sizes has {len(s.sizes)} entries for {len(s.tasks)} sft.tasks")
        if any(n <= 0 for n in s.sizes):
            raise ConfigError(f"sft.sizes={list(s.sizes)}: every size must be > 0")
    if s.source == "jsonl" and not s.files:
        raise ConfigError("sft.files: the jsonl source needs at least one file")
    if s.weights:
        if len(s.weights) != len(s.tasks):
            raise ConfigError(f"sft.weights has {len(s.weights)} entries for "
                              f"{len(s.tasks)} sft.tasks")
        if any(w < 0 for w in s.weights) or sum(s.weights) <= 0:
            raise ConfigError(f"sft.weights={list(s.weights)} must be >= 0 with a positive sum")
    if not 0 < s.min_ratio <= 1:
        raise ConfigError(f"sft.min_ratio={s.min_ratio} must be in (0, 1]")
    if s.max_ratio < 1:
        raise ConfigError(f"sft.max_ratio={s.max_ratio} must be >= 1")
    if s.resolution is not None and s.resolution < 24:
        raise ConfigError(f"sft.resolution={s.resolution}: shapes needs >= 24 pixels")
    if not 1 <= s.max_objects <= 9:
        raise ConfigError(f"sft.max_objects={s.max_objects} must be in [1, 9]")
    if s.tokenizers is not None and not s.tokenizers.strip():
        raise ConfigError("sft.tokenizers must be a directory or null")
    if s.eval_examples < 2:
        raise ConfigError(f"sft.eval_examples={s.eval_examples} must be >= 2 (chance compares "
                          "each example with the others)")


def validate_vqgan(v: VQGANConfig) -> None:
    """Checks of the image tokenizer's shape (also run when a saved tokenizer is loaded)."""
    for key, value in (("resolution", v.resolution), ("base_channels", v.base_channels),
                       ("num_res_blocks", v.num_res_blocks), ("norm_groups", v.norm_groups),
                       ("z_channels", v.z_channels), ("embed_dim", v.embed_dim),
                       ("codebook_size", v.codebook_size)):
        if value <= 0:
            raise ConfigError(f"vqgan.{key}={value} must be > 0")
    if not v.channel_mult or any(m <= 0 for m in v.channel_mult):
        raise ConfigError(f"vqgan.channel_mult={list(v.channel_mult)} must be a non-empty "
                          "list of positive multipliers")
    if v.resolution % v.downsample:
        raise ConfigError(f"vqgan.resolution={v.resolution} is not divisible by the "
                          f"downsampling factor {v.downsample} (2^(len(vqgan.channel_mult)-1))")
    for m in v.channel_mult:
        if (v.base_channels * m) % v.norm_groups:
            raise ConfigError(f"vqgan.norm_groups={v.norm_groups} does not divide "
                              f"vqgan.base_channels x {m} = {v.base_channels * m}")


def _validate_vqgan_train(t: VQGANTrainConfig) -> None:
    for key in ("steps", "batch_size", "lr", "b1", "b2", "images", "eval_images",
                "log_every", "disc_channels", "disc_layers"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"vqgan_train.{key}={getattr(t, key)} must be > 0")
    for key in ("beta", "codebook_weight", "restart_every", "disc_weight", "disc_start"):
        if getattr(t, key) < 0:
            raise ConfigError(f"vqgan_train.{key}={getattr(t, key)} must be >= 0")
    if not (t.b1 < 1 and t.b2 < 1):
        raise ConfigError(f"vqgan_train.b1={t.b1}, vqgan_train.b2={t.b2} must be in (0, 1)")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
