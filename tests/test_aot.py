"""Ahead-of-time compilation for TPU pods on this CPU machine (needs the `tpu` extra)."""

import json
import math

import jax
import pytest

from cm3leon_jax.config import ConfigError, MeshConfig
from cm3leon_jax.parallel import platform
from cm3leon_jax.parallel.mesh import make_mesh
from cm3leon_jax.aot.topology import parse_topology, slice_grid
from cm3leon_jax.train.state import abstract_state, tree_bytes
from conftest import run_cli

# Cloud TPU's standard slice shapes (the ones MaxText's accelerator_to_spec_map lists).
STANDARD = {
    "v5e-4": (2, 2), "v5e-8": (2, 4), "v5e-16": (4, 4), "v5e-32": (4, 8), "v5e-64": (8, 8),
    "v5e-128": (8, 16), "v5e-256": (16, 16), "v6e-256": (16, 16),
    "v4-8": (2, 2, 1), "v4-16": (2, 2, 2), "v4-32": (2, 2, 4), "v4-64": (2, 4, 4),
    "v4-128": (4, 4, 4), "v4-256": (4, 4, 8), "v4-512": (4, 8, 8), "v4-1024": (8, 8, 8),
    "v5p-8": (2, 2, 1), "v5p-128": (4, 4, 4), "v5p-2048": (8, 8, 16), "v5p-8192": (16, 16, 16),
}


def test_topology_names():
    for name, grid in STANDARD.items():
        t = parse_topology(name)
        assert t.grid == grid and t.num_slices == 1, name
        assert t.num_chips == int(name.split("-")[1]) // t.chip.cores_in_name
    t = parse_topology("2xv5p-128")
    assert (t.num_slices, t.num_chips, t.libtpu_topology) == (2, 128, "v5:4x4x4")
    for chips in (4, 8, 16, 32, 64, 128, 256):
        assert math.prod(slice_grid(chips, 2)) == chips
    for bad in ("v5e-12", "v5e-2", "v5p-4", "v5p-12", "v7-8", "v5e16", "v5e-512", "0xv5e-4"):
        with pytest.raises(ConfigError, match="--topology"):
            parse_topology(bad)


def test_libtpu_env_only_without_tpu(monkeypatch):
    """No TPU and no GPU: JAX_PLATFORMS defaults to cpu; set values are kept; a TPU host
    is left alone."""
    pytest.importorskip("libtpu")
    keys = ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
            "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD")
    monkeypatch.setattr(platform, "_GPU_DEVICE_FILES", ())
    monkeypatch.setattr(platform, "host_has_tpu", lambda: False)
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    platform.describe_host_without_tpu()
    assert all(k in platform.os.environ for k in keys)
    assert platform.os.environ["JAX_PLATFORMS"] == "cpu"

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    platform.describe_host_without_tpu()
    assert platform.os.environ["JAX_PLATFORMS"] == "cuda"

    for k in keys:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(platform, "host_has_tpu", lambda: True)
    platform.describe_host_without_tpu()
    assert not any(k in platform.os.environ for k in keys)


def test_multislice_mesh_puts_slices_on_data():
    pytest.importorskip("libtpu")
    devices = parse_topology("2xv5e-4").devices()
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ConfigError, match="slices divide neither"):
        make_mesh(MeshConfig(data=1, fsdp=1, tensor=8), devices)


# conftest's persistent cache stores compile-only executables but cannot load them back
# without a TPU client; jax then warns and compiles, which is what we want.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_compile_tiny_for_v5e_4(tiny, capsys):
    pytest.importorskip("libtpu")
    code, out, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml",
                              "--topology", "v5e-4", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["chips"], r["device_kind"], r["mesh"]) == (
        4, "TPU v5 lite", {"data": 1, "fsdp": 4, "tensor": 1})

    # parameters + optimizer state per chip: what `cm3leon params` says for 4 devices ...
    code, out, _ = run_cli(capsys, "params", "--config", "configs/tiny.yaml",
                            "--devices", "4", "--json")
    assert code == 0
    assert r["param_bytes"] + r["optimizer_bytes"] == json.loads(out)["state_bytes_per_device"]
    # ... and, counted another way, a quarter of every array (each is split over fsdp on
    # its embedding dimension) plus the replicated scalar counters.
    cfg = tiny()
    state = abstract_state(cfg)
    scalars = sum(tree_bytes(x) for x in jax.tree.leaves(state) if x.ndim == 0)
    assert r["param_bytes"] * 4 == tree_bytes(state.params)
    assert r["optimizer_bytes"] == (
        (tree_bytes(state) - tree_bytes(state.params) - scalars) // 4 + scalars)
    rows = cfg.train.batch_size // 4
    assert r["batch_bytes"] == rows * cfg.data.seq_len * 4 * 5

    # the compiler's own view: the state and batch are its arguments (TPU tiles pad them),
    # the donated state is aliased to the output, and there is work in between
    logical = r["param_bytes"] + r["optimizer_bytes"] + r["batch_bytes"]
    assert r["argument_bytes"] >= logical
    assert r["param_bytes"] + r["optimizer_bytes"] <= r["alias_bytes"] <= r["argument_bytes"]
    # (libtpu may report no temporaries for a step this small)
    assert r["temp_bytes"] >= 0 and r["flops_per_chip"] > 0 and r["code_bytes"] > 0
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                + r["temp_bytes"] + r["code_bytes"])
    assert r["fits"] and r["total_bytes"] < r["hbm_bytes"] == 16 * 2**30
    tokens = cfg.train.batch_size * cfg.data.seq_len
    assert r["tokens_per_step"] == tokens
    assert r["model_flops_per_chip"] == cfg.model.flops_per_token(cfg.vocab.build().size,
                                                        cfg.data.seq_len) * tokens / 4
    assert r["peak_step_seconds"] == r["model_flops_per_chip"] / 197e12
    if r["compiler_seconds"] is not None:
        assert r["mfu"] == pytest.approx(r["flops_per_chip"] / (r["compiler_seconds"] * 197e12))
        assert r["step_seconds"] == pytest.approx(
            r["model_flops_per_chip"] / (r["mfu"] * 197e12))


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_too_big_for_its_pod_fails_clearly(capsys):
    pytest.importorskip("libtpu")
    # 2 layers of 64 x 2^24 FFN matrices: 4 GiB per chip of parameters alone on v5e-4
    code, out, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml",
                              "--topology", "v5e-4", "model.d_ff=16777216")
    assert code == 1 and out == ""
    assert "configs/tiny.yaml does not fit v5e-4" in err
    assert "GiB of HBM (over by" in err
    assert "parameters 4.00 GiB, optimizer state 8.00 GiB" in err
    assert "mesh.fsdp=4" in err and "train.grad_accum=2" in err


def test_compile_rejects_bad_input_before_compiling(capsys):
    code, _, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml",
                            "--topology", "v5e-12")
    assert code == 2 and "power of two" in err
    code, _, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml",
                            "--topology", "v5e-16", "mesh.tensor=3")
    assert code == 2 and "mesh" in err


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_fit_batch_finds_the_largest_micro_batch_that_fits(tiny, capsys):
    """Real compiles of every option give the memory curve; with an HBM between the second
    and third options, the search lands on the second-smallest micro-batch that fits."""
    pytest.importorskip("libtpu")
    import dataclasses

    from cm3leon_jax.aot import train_step

    cfg = tiny("train.batch_size=32")
    topology = parse_topology("v5e-4")
    options = train_step.micro_batch_options(cfg, 4)
    assert options == [1, 2, 4, 8]  # 8, 4, 2, 1 sequences per chip
    totals = [train_step.compile_train_step(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=g)),
        topology).total_bytes for g in options]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    small = dataclasses.replace(topology, chip=dataclasses.replace(
        topology.chip, hbm_bytes=(totals[1] + totals[2]) // 2))
    best, tried = train_step.largest_fitting_micro_batch(cfg, small, progress=lambda _: None)
    assert best.train.grad_accum == 4
    assert [g for g, _, _ in tried] == [2, 4]  # a binary search: two compiles of four
    assert [(r.total_bytes, r.fits) for _, _, r in tried] == [(totals[1], False),
                                                            (totals[2], True)]

    code, out, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml", "--topology",
                             "v5e-4", "--json", "--fit-batch", "train.batch_size=32")
    assert code == 0, err
    assert json.loads(out)["grad_accum"] == 1 and "train.grad_accum=1 (8 sequences" in err
    code, _, err = run_cli(capsys, "compile", "--config", "configs/tiny.yaml", "--topology",
                           "v5e-4", "--fit-batch", "--step", "generate")
    assert code == 2 and "--fit-batch searches train.grad_accum" in err
