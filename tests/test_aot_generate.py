"""Ahead-of-time compilation of the generation step for TPU pods (needs the `tpu` extra)."""

import json

import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.aot.generate_step import flops_per_image_token, generate_shape
from cm3leon_jax.train.state import abstract_state, tree_bytes
from conftest import run_cli


def test_generate_shape_defaults_and_padding(tiny):
    cfg = tiny()  # no generate.image_tokens: the vqgan section's 8 x 8 latent grid
    s = generate_shape(cfg, 4)
    assert (s.batch, s.padded_batch, s.streams, s.image_tokens, s.prompt_tokens) == (
        1, 2, 2, 64, 64)  # CFG on (cfg_scale 3), 2 x 2 rows over 4 chips, 128 - 64 context
    s = generate_shape(cfg, 4, batch=3, cfg_on=False)
    assert (s.padded_batch, s.rows, s.cache_len) == (4, 4, 128)
    s = generate_shape(tiny("generate.cfg_scale=1.0", "generate.image_tokens=16"), 8, batch=5)
    assert (s.streams, s.padded_batch, s.image_tokens, s.prompt_tokens) == (1, 8, 16, 112)
    s = generate_shape(tiny("generate.cfg_scale=1.0", "generate.pool=cdk"), 1)
    assert s.streams == 2  # CD-K needs the unconditional stream
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=128"):
        generate_shape(cfg, 4, image_tokens=100, prompt_tokens=40)
    with pytest.raises(ConfigError, match="--batch=0"):
        generate_shape(cfg, 4, batch=0)


def test_compile_generate_rejects_bad_sizes_before_compiling(capsys):
    code, _, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml", "--topology",
                            "v5e-4", "--step", "generate", "--image-tokens", "1024")
    assert code == 2 and "--image-tokens=1024 leaves no room for a prompt" in err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_compile_generate_tiny_for_v5e_4(tiny, capsys):
    pytest.importorskip("libtpu")
    code, out, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml",
                              "--topology", "v5e-4", "--step", "generate", "--batch", "3",
                              "--json")
    assert code == 0, err
    r = json.loads(out)
    cfg = tiny()
    m = cfg.model
    assert (r["chips"], r["device_kind"], r["mesh"]) == (
        4, "TPU v5 lite", {"data": 1, "fsdp": 4, "tensor": 1})
    assert (r["batch"], r["padded_batch"], r["streams"], r["prompt_tokens"],
            r["image_tokens"]) == (3, 4, 2, 64, 64)
    # the parameters are the train state's, in its shardings: a quarter of each array per
    # chip, as `cm3leon compile --step train` reports them (tests/test_aot.py)
    assert r["param_bytes"] * 4 == tree_bytes(abstract_state(cfg).params)
    # keys + values: layers x 2 x rows x columns x d_model x 4 bytes (float32), rows split
    # over the 4 fsdp chips
    rows, columns = 4 * 2, 64 + 64
    assert r["kv_cache_bytes"] == m.n_layers * 2 * rows * columns * m.d_model * 4 // 4
    # the compiler's view: parameters and prompts are its arguments (TPU tiles pad them),
    # the cache lives in its temporaries
    assert r["argument_bytes"] >= r["param_bytes"]
    assert r["temp_bytes"] >= r["kv_cache_bytes"] and r["code_bytes"] > 0
    assert r["output_bytes"] >= 4 * 64 * 4  # [4 samples, 64 tokens] int32, replicated or not
    assert r["total_bytes"] >= r["argument_bytes"] + r["temp_bytes"]
    assert r["fits"] and r["total_bytes"] < r["hbm_bytes"] == 16 * 2**30
    vocab = cfg.vocab.build().size
    matmul = m.n_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.d_ff) + m.d_model * vocab
    mean_context = 64 + 65 / 2
    assert r["flops_per_image_token"] == 2 * (2 * matmul + 4 * m.n_layers * mean_context
                                              * m.d_model)
    assert r["flops_per_chip_per_step"] == r["flops_per_image_token"] * 4 / 4
    assert flops_per_image_token(cfg, vocab, generate_shape(cfg, 4, cfg_on=False)) * 2 == \
        r["flops_per_image_token"]


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_generate_too_big_for_its_pod_fails_clearly(capsys):
    pytest.importorskip("libtpu")
    # 2 layers of 64 x 2^26 FFN matrices: 16 GiB per chip of float32 parameters on v5e-4
    code, out, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml",
                              "--topology", "v5e-4", "--step", "generate",
                              "model.d_ff=67108864")
    assert code == 1 and out == ""
    assert "configs/tiny.yaml generation does not fit v5e-4" in err
    assert "GiB of HBM (over by" in err
    assert "parameters 16.00 GiB, KV cache 128.00 KiB for 4 rows x 128 columns" in err
    assert "mesh.fsdp=4" in err and "mesh.tensor=2" in err
    assert "--batch" not in err and "--prompt-tokens" not in err  # they would not help
