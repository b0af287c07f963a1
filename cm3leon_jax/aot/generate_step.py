"""`cm3leon compile --step generate`: compile the real image-generation step for a TPU pod
that is not attached, and say whether its parameters, KV cache and temporaries fit each
chip's HBM.

The step is `decode.decode_cached` (prefill + the decode loop over the KV cache), which
`cm3leon generate image` runs through `tasks.text_to_image`: the parameters in the
shardings of the config's mesh (where `train.weights.load` puts them when that mesh fits
the devices), the prompt rows split over
the batch axes (`decode.decode`), everything else replicated; with `generate.weights: int8`
the parameters are int8 with per-channel scales (model/quant.py), as generation holds them.
It is lowered from ShapeDtypeStructs only, so no parameter is ever materialised.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cm3leon_jax.config import Config, ConfigError
from cm3leon_jax.generate.decode import PROMPT_ALIGN, Decoding, Scales, decode_cached
from cm3leon_jax.generate.tasks import candidate_methods
from cm3leon_jax.model import quant
from cm3leon_jax.model.transformer import CACHE
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.aot.compile import compile_or_explain, human_bytes
from cm3leon_jax.aot.topology import GiB, Topology
from cm3leon_jax.train.state import shard_bytes, state_layout


@dataclasses.dataclass(frozen=True)
class GenerateShape:
    """What one compiled generation step does: `batch` images of `image_tokens` tokens
    after prompts of `prompt_tokens`, with or without the CFG stream."""
    batch: int  # images asked for
    padded_batch: int  # after padding rows to a multiple of the batch-parallel chips
    streams: int  # 2 with CFG (conditional + unconditional rows), else 1
    prompt_tokens: int
    image_tokens: int

    @property
    def rows(self) -> int:
        return self.padded_batch * self.streams

    @property
    def cache_len(self) -> int:
        return self.prompt_tokens + self.image_tokens


@dataclasses.dataclass(frozen=True)
class GenerateReport:
    topology: str
    device_kind: str
    chips: int
    mesh: dict
    hbm_bytes: int
    batch: int
    padded_batch: int
    streams: int
    prompt_tokens: int
    image_tokens: int
    weights: str  # generate.weights: float (as trained) or int8
    # per chip, from the shardings
    param_bytes: int
    kv_cache_bytes: int  # keys + values of every layer (the decode loop's carry)
    # per chip, from the compiler's memory analysis
    argument_bytes: int
    output_bytes: int
    temp_bytes: int  # the KV cache, logits and other temporaries
    code_bytes: int
    total_bytes: int  # argument + output - alias + temp + code
    fits: bool
    flops_per_image_token: float  # model estimate, all streams of one sample, at mid-decode
    flops_per_chip_per_step: float  # one decode step of every row, per chip
    compile_seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def generate_shape(cfg: Config, chips_for_batch: int, batch: int | None = None,
                   image_tokens: int | None = None, prompt_tokens: int | None = None,
                   cfg_on: bool | None = None) -> GenerateShape:
    """Defaults: generate.candidates images, generate.image_tokens (else the image
    tokenizer's), CFG when generation would use it, prompts filling the rest of the
    model's context (retrieval-augmented prompts do)."""
    g = cfg.generate
    batch = g.candidates if batch is None else batch
    image_tokens = image_tokens or g.image_tokens or cfg.vqgan.tokens_per_image
    if cfg_on is None:
        cfg_on = g.cfg_scale != 1.0 or bool(candidate_methods(g).any())
    max_len = cfg.model.max_seq_len
    if image_tokens >= max_len:
        raise ConfigError(f"--image-tokens={image_tokens} leaves no room for a prompt: it "
                          f"must be less than model.max_seq_len={max_len}")
    if prompt_tokens is None:
        prompt_tokens = (max_len - image_tokens) // PROMPT_ALIGN * PROMPT_ALIGN
    for name, value in (("--batch", batch), ("--image-tokens", image_tokens),
                        ("--prompt-tokens", prompt_tokens)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1 (model.max_seq_len={max_len})")
    if prompt_tokens + image_tokens > max_len:
        raise ConfigError(f"--prompt-tokens={prompt_tokens} + --image-tokens={image_tokens} "
                          f"exceeds model.max_seq_len={max_len}")
    streams = 2 if cfg_on else 1
    padded = batch
    while (padded * streams) % chips_for_batch:  # as decode.decode pads rows
        padded += 1
    return GenerateShape(batch, padded, streams, prompt_tokens, image_tokens)


def flops_per_image_token(cfg: Config, vocab_size: int, shape: GenerateShape) -> float:
    """Forward FLOPs of one generated token of one sample (all its streams): 2 x matmul
    parameters + attention over the cache (4 x context x d per layer), at the mean
    context of the decode loop."""
    m = cfg.model
    context = shape.prompt_tokens + (shape.image_tokens + 1) / 2
    return shape.streams * (2.0 * m.matmul_params(vocab_size)
                            + 4.0 * m.n_layers * context * m.d_model)


def compile_generate_step(cfg: Config, topology: Topology, shape_of, devices=None
                          ) -> GenerateReport:
    """Lower and compile `decode_cached` for `topology`; `shape_of(batch_chips)` gives the
    GenerateShape. Raises DoesNotFit."""
    devices = topology.devices() if devices is None else devices
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    shape = shape_of(mesh.shape["data"] * mesh.shape["fsdp"])
    vocab = cfg.vocab.build()
    _, mdef, state = state_layout(cfg, mesh)
    shardings = state.params
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          mdef.abstract_params, shardings)
    if cfg.generate.weights == "int8":  # as generation loads them: model/quant.py
        params = quant.abstract_quantize(
            mdef.abstract_params, mesh_lib.shardings(quant.qparam_axes(mdef.param_axes), mesh))
    replicated = NamedSharding(mesh, P())
    rows, B = shape.rows, shape.padded_batch
    sds = lambda s, dt, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh)
    tokens = sds((rows, shape.prompt_tokens), jnp.int32, mesh_lib.batch_sharding(mesh, 2))
    lengths = sds((rows,), jnp.int32, mesh_lib.batch_sharding(mesh, 1))
    use_cdk = sds((B,), jnp.bool_, replicated)
    scales = Scales(*(sds((), jnp.float32, replicated) for _ in Scales._fields))
    key = sds((), jax.eval_shape(lambda: jax.random.key(0)).dtype, replicated)
    g = cfg.generate
    d = Decoding("image", shape.image_tokens, temperature=g.temperature, top_k=g.top_k,
                 top_p=g.top_p, guidance="cfg" if shape.streams == 2 else "none",
                 cd_k=g.cd_k, cd_sample=g.cd_sample)
    m = cfg.model
    kv = sds((m.n_layers, rows, shape.cache_len, m.n_heads, m.head_dim), m.dtype,
             NamedSharding(mesh, mesh_lib.spec(CACHE)))
    per_chip = {"param_bytes": shard_bytes(params), "kv_cache_bytes": 2 * shard_bytes(kv)}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = decode_cached.lower(mdef.graphdef, params, tokens, lengths, use_cdk, scales,
                                      key, vocab=vocab, d=d)
        compiled = compile_or_explain(
            lowered, lambda _, need, have: _advice(cfg, topology, dict(mesh.shape), shape,
                                                  per_chip, need, have))
    compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    per_token = flops_per_image_token(cfg, vocab.size, shape)
    return GenerateReport(
        topology=topology.name, device_kind=devices[0].device_kind, chips=len(devices),
        mesh=dict(mesh.shape), hbm_bytes=topology.chip.hbm_bytes,
        **dataclasses.asdict(shape), weights=cfg.generate.weights, **per_chip,
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
        total_bytes=total, fits=total <= topology.chip.hbm_bytes,
        flops_per_image_token=per_token,
        flops_per_chip_per_step=per_token * B / len(devices),
        compile_seconds=compile_seconds)


def _advice(cfg: Config, topology: Topology, mesh: dict, shape: GenerateShape,
           per_chip: dict, need: int, have: int) -> str:
    """Name the overshoot and the knobs that reduce it."""
    lines = [
        f"generation does not fit {topology.name}: it needs {need / GiB:.2f} GiB per chip, "
        f"the chip has {have / GiB:.2f} GiB of HBM (over by {(need - have) / GiB:.2f} GiB)",
        f"  per chip: parameters {human_bytes(per_chip['param_bytes'])}, KV cache "
        f"{human_bytes(per_chip['kv_cache_bytes'])} for {shape.rows} rows x "
        f"{shape.cache_len} columns (mesh data={mesh['data']} fsdp={mesh['fsdp']} "
        f"tensor={mesh['tensor']})",
        "  what would help:"]
    if shape.batch > 1:
        lines.append(f"  - a smaller --batch (now {shape.batch}): the KV cache and logits "
                     "grow with it")
    if per_chip["param_bytes"] > have / 2:
        lines.append(f"  - shard the parameters over more chips: mesh.fsdp={mesh['fsdp']}, "
                     f"mesh.tensor={mesh['tensor']}, or a larger pod")
    if mesh["tensor"] == 1:
        lines.append("  - mesh.tensor=2 or more: splits the KV cache's heads and the logits' "
                     "vocabulary too")
    if per_chip["kv_cache_bytes"] > have / 8:
        lines.append(f"  - shorter prompts: --prompt-tokens (now {shape.prompt_tokens})")
    return "\n".join(lines)


def format_report(r: GenerateReport, config_name: str) -> str:
    g = lambda b: f"{human_bytes(b):>11}"
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    cfg = "with CFG (2 streams)" if r.streams == 2 else "without CFG"
    return "\n".join([
        f"config              {config_name}",
        f"topology            {r.topology}: {r.chips} x {r.device_kind}, mesh {mesh}",
        f"generation          {r.batch} image(s) (padded to {r.padded_batch}) of "
        f"{r.image_tokens} tokens after {r.prompt_tokens}-token prompts, {cfg}",
        f"per chip            HBM {human_bytes(r.hbm_bytes)}",
        f"  parameters        {g(r.param_bytes)}  ({r.weights})",
        f"  KV cache          {g(r.kv_cache_bytes)}",
        f"  temporaries       {g(r.temp_bytes)}  (KV cache, logits, ...)",
        f"  code              {g(r.code_bytes)}",
        f"  total             {g(r.total_bytes)}  ({100 * r.total_bytes / r.hbm_bytes:.1f}% of "
        f"HBM: {'fits' if r.fits else 'DOES NOT FIT'})",
        f"FLOPs per token     {r.flops_per_image_token:.4g} per generated image token "
        f"(2 x matmul params + attention, all streams); {r.flops_per_chip_per_step:.4g} per "
        "chip per decode step",
        f"compiled in         {r.compile_seconds:.1f} s",
    ])


def fit_advice(cfg: Config, topology: Topology, r: GenerateReport) -> str:
    """For a step that compiled but whose total exceeds the chip's HBM."""
    shape = GenerateShape(r.batch, r.padded_batch, r.streams, r.prompt_tokens, r.image_tokens)
    per_chip = {"param_bytes": r.param_bytes, "kv_cache_bytes": r.kv_cache_bytes}
    return _advice(cfg, topology, r.mesh, shape, per_chip, r.total_bytes, r.hbm_bytes)

