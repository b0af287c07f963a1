"""Export (safetensors, HF OPT), import back into training, and per-token scoring.

The run directory is a real checkpoint (train state, data iterator, config) written by
`checkpoint.save` from a (2, 2, 2) mesh, with every parameter drawn at random with std 0.3:
at init the output projections are zero, and tests on such weights would not see a wrong
attention or FFN mapping. Everything else reads it on other meshes.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest

from cm3leon_jax.cli import main as cli
from cm3leon_jax.config import ConfigError, MeshConfig
from cm3leon_jax.eval.score import score_tokens
from cm3leon_jax.export import hf_opt, tokenizers
from cm3leon_jax.export.write import export
from cm3leon_jax.parallel.mesh import make_mesh
from cm3leon_jax.data.pipeline import train_batches
from cm3leon_jax.layout import DataDir
from cm3leon_jax.train import checkpoint, weights as weights_lib
from cm3leon_jax.train.trainer import train
from cm3leon_jax.train.state import create_state, init_params, model_def, state_layout
from cm3leon_jax.train.step import loss_sums
from test_step import batch_of

RUN = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
STEP = 3
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def mesh_of(data, fsdp, tensor):
    return make_mesh(MeshConfig(data, fsdp, tensor), jax.devices()[:data * fsdp * tensor])


def host(tree):
    return jax.tree.map(np.asarray, tree)


def write_run(cfg, workdir, seed=0, std=0.3):
    """A run directory whose checkpoint at STEP holds random parameters."""
    mesh = make_mesh(cfg.mesh)
    tx, mdef, shardings = state_layout(cfg, mesh)
    with jax.set_mesh(mesh):
        state = create_state(cfg, tx, shardings)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a, s: jax.device_put(rng.normal(0, std, a.shape).astype(np.float32), s),
        mdef.abstract_params, shardings.params)
    mngr = checkpoint.manager(workdir / "checkpoints", 1)
    checkpoint.save(mngr, STEP, state.replace(params=params), train_batches(cfg), cfg)
    mngr.wait_until_finished()
    return workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from cm3leon_jax.config import load_config
    from conftest import CONFIGS

    return write_run(load_config(CONFIGS / "tiny.yaml", RUN), tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "st"
    export(run, out, "safetensors", mesh=mesh_of(1, 4, 1), piece_bytes=3000)
    return out


def test_safetensors_round_trip_is_bit_exact(run, exported):
    from safetensors.numpy import load_file

    ref = weights_lib.load(run, mesh=mesh_of(1, 1, 1))
    back = weights_lib.load(exported, mesh=mesh_of(1, 2, 4))
    assert back.cfg == ref.cfg and back.step == ref.step == STEP
    assert back.mesh.shape == {"data": 1, "fsdp": 2, "tensor": 4}
    flat = load_file(str(exported / "model.safetensors"))  # the reference reader
    names = {"embed", "pos", "blocks.attn.qkv", "blocks.attn.out", "blocks.ffn.w_in",
             "blocks.ffn.w_out"}
    assert set(flat) == names
    ref_leaves = jax.tree.leaves_with_path(host(ref.params))
    assert len(ref_leaves) == len(names)
    for path, want in ref_leaves:
        name = ".".join(k.key for k in path)
        assert flat[name].dtype == want.dtype and np.array_equal(flat[name], want), name
    for got, want in zip(jax.tree.leaves(host(back.params)), jax.tree.leaves(host(ref.params))):
        assert got.tobytes() == want.tobytes()
    meta = json.loads((exported / "config.json").read_text())
    assert meta["format"] == "cm3leon_jax"
    assert meta["config"] == json.loads(json.dumps(ref.cfg.to_dict()))
    assert meta["tensors"]["blocks.attn.qkv"] == ["layers", "embed", "qkv", "heads", "head_dim"]
    assert meta["tokenizers"] == []  # the synthetic source has none
    assert json.loads((exported / "vocab.json").read_text())["size"] == 1152


@pytest.mark.slow
def test_train_init_from_starts_at_the_exported_weights(tiny, run, exported, tmp_path):
    cfg = tiny("train.steps=1", "optimizer.warmup_steps=1", f"train.init_from={exported}")
    (first,) = train(cfg, tmp_path / "ft").history
    weights = weights_lib.load(exported, mesh=mesh_of(1, 1, 1))
    batch = batch_of(cfg, cfg.train.batch_size)  # the run's first batch
    sums = loss_sums(weights.mdef.bind(host(weights.params)), batch, cfg.vocab.build())
    np.testing.assert_allclose(first["loss"], sums["ce"] / sums["w"], rtol=1e-5)
    fresh = loss_sums(weights.mdef.bind(init_params(cfg, cfg.train.seed)), batch,
                      cfg.vocab.build())
    assert abs(first["loss"] - fresh["ce"] / fresh["w"]) > 1.0  # not the random init
    with pytest.raises(ConfigError, match=r"the export has model.d_ff=256 but the config says 128"):
        train(tiny("train.steps=1", "optimizer.warmup_steps=1", "model.d_ff=128",
                   f"train.init_from={exported}"), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"train.init_from=.*nowhere.*does not exist"):
        train(tiny("train.steps=1", "optimizer.warmup_steps=1",
                   f"train.init_from={tmp_path / 'nowhere'}"), tmp_path / "bad2")


def test_export_refuses_bad_requests_before_reading(run, exported, tmp_path, tiny):
    with pytest.raises(ConfigError, match=r"no checkpoint for step 2 \(it has \[3\]\)"):
        export(run, tmp_path / "a", "safetensors", step=2)
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        export(run, exported, "safetensors")
    assert cli(["export", "--workdir", str(run), "--format", "hf-opt", "--out",
                str(exported)]) == 2
    with pytest.raises(ConfigError, match="not one of"):
        export(run, tmp_path / "b", "onnx")
    with pytest.raises(ConfigError, match="model.qk_norm=true: OPT has no LayerNorm"):
        hf_opt.check(tiny("model.qk_norm=true"))
    with pytest.raises(ConfigError, match="model.swin_norm=true: OPT only has the pre-LN"):
        hf_opt.check(tiny("model.swin_norm=true"))
    with pytest.raises(ConfigError, match="model.positions='rope': OPT only has learned"):
        hf_opt.check(tiny("model.positions=rope"))
    assert hf_opt.config_json(tiny("model.activation=gelu"))["activation_function"] == "gelu_new"
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_tokenizer_files_of_the_data_dir_are_copied(tmp_path):
    """The two tokenizers of a prepared directory, by the layout's names; nothing else (not
    the vocabulary or the manifest of the data, not the image tokenizer's training run, not
    the documents)."""
    data = tmp_path / "data"
    for rel in ("text_tokenizer.model", "vocab.json", "manifest.json", "image_tokenizer/vqgan.npz",
                "image_tokenizer/vqgan.json", "image_tokenizer_training/image_tokenizer/vqgan.npz",
                "documents/shard-00000-of-00001.array_record", "skipped.jsonl",
                "retrieval/neighbors.npy"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(rel.encode())
    out = DataDir(tmp_path / "out" / "tokenizers")
    copied = tokenizers.copy_tokenizers(data, out)
    assert sorted(str(p.relative_to(out.root)) for p in copied) == [
        "image_tokenizer/vqgan.json", "image_tokenizer/vqgan.npz", "text_tokenizer.model"]
    assert (out.image_tokenizer / "vqgan.npz").read_bytes() == b"image_tokenizer/vqgan.npz"
    with pytest.raises(ConfigError, match="does not exist here"):
        tokenizers.copy_tokenizers(tmp_path / "missing", DataDir(tmp_path / "out2"))


@pytest.mark.skipif(not HAS_TORCH, reason="needs the interop extra (torch, transformers)")
@pytest.mark.parametrize("overrides", [[], ["model.activation=gelu", "model.tie_embeddings=false"]])
def test_hf_opt_logits_equal_ours(run, tiny, tmp_path, overrides):
    import torch
    from transformers import OPTForCausalLM

    workdir = run
    if overrides:
        workdir = write_run(tiny(*RUN, *overrides), tmp_path / "run", seed=1)
    out = tmp_path / "opt"
    export(workdir, out, "hf-opt", mesh=mesh_of(2, 2, 2))
    model, info = OPTForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    ours = weights_lib.load(workdir, mesh=mesh_of(1, 1, 1))
    net = ours.mdef.bind(host(ours.params))
    tokens = np.random.default_rng(0).integers(0, ours.cfg.vocab.build().used_size, (3, 128))
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(tokens)).logits.numpy()
    positions = np.broadcast_to(np.arange(128), tokens.shape)
    want = np.asarray(net.logits(net(tokens, positions)))
    assert theirs.shape == want.shape == (3, 128, 1152)
    scale = np.abs(want).max()
    assert scale > 1.0
    np.testing.assert_allclose(theirs, want, rtol=1e-4, atol=1e-4 * scale)


def test_score_equals_a_direct_computation(run, exported, tmp_path, capsys):
    weights = weights_lib.load(run, mesh=mesh_of(2, 2, 1))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, weights.cfg.vocab.build().used_size, (7, 48)).astype(np.int32)
    got = score_tokens(weights, tokens, batch_size=3)  # 3 rows -> 4 (data x fsdp); padded
    assert got.shape == (7, 47) and got.dtype == np.float32
    net = weights.mdef.bind(host(weights.params))
    for b in range(7):  # one row at a time, unsharded, log-softmax in float64
        lg = np.asarray(net.logits(net(tokens[b:b + 1], np.arange(48)[None])), np.float64)[0, :47]
        logz = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        want = lg[np.arange(47), tokens[b, 1:]] - logz
        np.testing.assert_allclose(got[b], want, atol=2e-5)
    # causal: changing tokens after position k leaves the scores of tokens <= k unchanged
    changed = tokens.copy()
    changed[:, 30:] = rng.integers(5, 600, (7, 18))
    again = score_tokens(weights, changed, batch_size=3)
    np.testing.assert_allclose(again[:, :29], got[:, :29], atol=1e-6)
    assert np.abs(again[:, 29:] - got[:, 29:]).max() > 0.1

    # the CLI: the run and its export give the same scores
    np.save(tmp_path / "in.npy", tokens)
    assert cli(["score", "--workdir", str(run), "--tokens", str(tmp_path / "in.npy"),
                "--out", str(tmp_path / "a.npy"), "--batch-size", "4"]) == 0
    assert cli(["score", "--export", str(exported), "--tokens", str(tmp_path / "in.npy"),
                "--out", str(tmp_path / "b.npy"), "--batch-size", "4"]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, got, atol=2e-5)
    assert "perplexity" in capsys.readouterr().out
    bad = tokens.copy()
    bad[2, 5] = 5000
    np.save(tmp_path / "bad.npy", bad)
    assert cli(["score", "--export", str(exported), "--tokens", str(tmp_path / "bad.npy"),
                "--out", str(tmp_path / "c.npy")]) == 2
    assert "token [2, 5] = 5000 is outside the vocabulary [0, 1045)" in capsys.readouterr().err


def test_weights_load_inside_a_mesh_context(tiny, exported):
    """model_def (and so loading) used to fail under jax.set_mesh on the `layers` axis."""
    cfg = tiny()
    outside = model_def(cfg)
    with jax.set_mesh(mesh_of(1, 8, 1)):
        inside = model_def(cfg)
        weights = weights_lib.load(exported)
    assert inside.param_axes == outside.param_axes
    assert inside.abstract_params == outside.abstract_params
    assert weights.step == STEP


def test_weights_overrides_may_not_change_the_tensors(run):
    w = weights_lib.load(run, overrides=["generate.temperature=0.5"], mesh=mesh_of(1, 1, 1))
    assert w.cfg.generate.temperature == 0.5 and w.step == STEP
    with pytest.raises(ConfigError, match=r"with model.d_ff=128: the run has model.d_ff=256 "
                                          r"but the config says 128"):
        weights_lib.load(run, overrides=["model.d_ff=128"])


def test_weights_read_only_the_parameters(tiny, tmp_path):
    """A checkpoint whose optimizer state is not what the config's optimizer makes (here:
    one stray array) still loads, with its parameters exactly: nothing else is read."""
    cfg = tiny()
    mesh = make_mesh(cfg.mesh)
    tx, _, shardings = state_layout(cfg, mesh)
    with jax.set_mesh(mesh):
        state = create_state(cfg, tx, shardings)
    mngr = checkpoint.manager(tmp_path / "checkpoints", 1)
    checkpoint.save(mngr, 1, state.replace(opt_state={"damaged": np.zeros(3, np.float32)}),
                    train_batches(cfg), cfg)
    mngr.wait_until_finished()
    w = weights_lib.load(tmp_path, mesh=mesh_of(1, 2, 1))
    assert w.step == 1
    for got, want in zip(jax.tree.leaves(host(w.params)), jax.tree.leaves(host(state.params))):
        assert got.tobytes() == want.tobytes()
