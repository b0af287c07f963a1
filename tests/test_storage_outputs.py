"""Exports, weights, scoring and retrieval on cloud storage (`gs://`, storage.py), against
the GCS emulator of conftest.py: every output equals the one written to a local directory
from the same inputs, and reads back through the same code.

The run is test_export's random-weight checkpoint, written locally and copied into the
bucket with `storage.copy` where a `gs://` run is the input.
"""

import json

import jax
import numpy as np
import pytest

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError, RetrievalConfig, load_config
from cm3leon_jax.export import tokenizers
from cm3leon_jax.export.write import export
from cm3leon_jax.layout import DataDir, ExportDir
from cm3leon_jax.retrieval import index
from cm3leon_jax.train import weights as weights_lib
from conftest import CONFIGS, run_cli
from test_export import RUN, STEP, host, mesh_of, write_run
from test_retrieval import TINY, write_prepared


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(load_config(CONFIGS / "tiny.yaml", RUN), tmp_path_factory.mktemp("run"))


def _same_params(a, b) -> None:
    flat_a, flat_b = weights_lib.flatten(host(a.params)), weights_lib.flatten(host(b.params))
    assert list(flat_a) == list(flat_b)
    for name in flat_a:
        np.testing.assert_array_equal(flat_a[name], flat_b[name], err_msg=name)


def test_export_to_gs_equals_the_local_export_and_loads_back(run, bucket, tmp_path, capsys):
    for fmt in ("safetensors", "hf-opt"):
        local, remote = tmp_path / fmt, f"{bucket}/{fmt}"
        for out in (local, remote):
            code, _, err = run_cli(capsys, "export", "--workdir", str(run), "--format", fmt,
                                   "--out", str(out))
            assert code == 0, err
        names = sorted(p.name for p in storage.path(remote).iterdir())
        assert names == sorted(p.name for p in local.iterdir())
        for name in names:  # the same bytes: weights, config.json, vocab.json
            assert storage.path(f"{remote}/{name}").read_bytes() == (local / name).read_bytes()
        assert not storage.path(f"{remote}.partial").exists()
    # the safetensors export reads back from the bucket bit-exactly, on another mesh
    back = weights_lib.load(f"{bucket}/safetensors", mesh=mesh_of(1, 2, 4))
    ref = weights_lib.load(run, mesh=mesh_of(1, 1, 1))
    assert back.step == ref.step == STEP and back.cfg == ref.cfg
    assert back.origin == f"{bucket}/safetensors"
    _same_params(back, ref)
    # an occupied gs:// output is refused before any array is read
    code, _, err = run_cli(capsys, "export", "--workdir", str(run), "--format", "safetensors",
                           "--out", f"{bucket}/safetensors")
    assert code == 2 and "already exists and is not an empty directory" in err


def test_score_reads_and_writes_gs(run, bucket, tmp_path, capsys):
    tokens = np.random.default_rng(1).integers(0, 1045, (5, 24)).astype(np.int32)
    np.save(tmp_path / "in.npy", tokens)
    storage.copy(tmp_path / "in.npy", f"{bucket}/in.npy")
    code, _, err = run_cli(capsys, "export", "--workdir", str(run), "--format", "safetensors",
                           "--out", f"{bucket}/export")
    assert code == 0, err
    code, _, err = run_cli(capsys, "score", "--workdir", str(run), "--tokens",
                           str(tmp_path / "in.npy"), "--out", str(tmp_path / "local.npy"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "score", "--export", f"{bucket}/export", "--tokens",
                             f"{bucket}/in.npy", "--out", f"{bucket}/scores.npy")
    assert code == 0, err
    assert f"-> {bucket}/scores.npy" in out
    with storage.path(f"{bucket}/scores.npy").open("rb") as f:
        np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "local.npy"))


def test_weights_load_from_a_gs_run_and_init_from_a_gs_export(run, bucket, tiny):
    storage.copy(run, f"{bucket}/run")
    remote = weights_lib.load(f"{bucket}/run", mesh=mesh_of(2, 2, 1))
    assert remote.step == STEP and remote.origin == f"{bucket}/run/checkpoints/{STEP}"
    _same_params(remote, weights_lib.load(run, mesh=mesh_of(1, 1, 1)))
    cfg, step, _ = weights_lib.saved_config(f"{bucket}/run")
    assert step == STEP and cfg == remote.cfg
    # train.init_from names a gs:// export: checked from its config alone, then read
    export(f"{bucket}/run", f"{bucket}/export", "safetensors", mesh=mesh_of(1, 4, 1),
           piece_bytes=3000)
    weights_lib.check_init(tiny(*RUN, f"train.init_from={bucket}/export"))
    with pytest.raises(ConfigError, match="does not exist"):
        weights_lib.check_init(tiny(*RUN, f"train.init_from={bucket}/missing"))
    _same_params(weights_lib.load(f"{bucket}/export", mesh=mesh_of(1, 1, 1)), remote)


def test_tokenizers_copy_into_and_out_of_gs(tmp_path, bucket):
    data = tmp_path / "data"
    for rel in ("text_tokenizer.model", "vocab.json", "manifest.json",
                "image_tokenizer/vqgan.npz", "image_tokenizer/vqgan.json", "skipped.jsonl"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(rel.encode())
    remote = DataDir(f"{bucket}/export/tokenizers")
    copied = tokenizers.copy_tokenizers(data, remote)
    want = ["image_tokenizer/vqgan.json", "image_tokenizer/vqgan.npz", "text_tokenizer.model"]
    assert sorted(str(p.relative_to(remote.root)) for p in copied) == want
    back = DataDir(tmp_path / "back")
    tokenizers.copy_tokenizers(remote.root, back)
    for rel in want:
        assert (back.root / rel).read_bytes() == rel.encode()
    # an export's own tokenizers/ on gs:// is where its tokenizers are found
    storage.path(ExportDir(f"{bucket}/export").config).write_text("{}")
    cfg = load_config(TINY)
    assert weights_lib.tokenizer_dir(cfg, f"{bucket}/export") == (
        remote.root, f"the tokenizers of {bucket}/export")


def test_a_tree_index_serialized_to_gs_loads_and_searches_as_built(tmp_path, bucket):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(600, 16)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    cfg = RetrievalConfig(exact_threshold=100, num_leaves=10, leaves_to_search=4)
    manifest = index.build_index(bank, tmp_path / "index", cfg)
    assert manifest["kind"] == "tree_ah"
    storage.copy(tmp_path / "index", f"{bucket}/copied")  # asset paths are relative
    queries = bank[:50] + 0.1 * rng.normal(size=(50, 16)).astype(np.float32)
    want = index.search(index.load_searcher(tmp_path / "index"), queries, 10)
    got = index.search(index.load_searcher(f"{bucket}/copied"), queries, 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    built = index.build_index(bank, f"{bucket}/built", cfg)
    assert json.loads(storage.path(f"{bucket}/built/{index.MANIFEST}").read_text()) == built
    found, _ = index.search(index.load_searcher(f"{bucket}/built"), bank[:20], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(20))


def test_retrieval_dir_on_gs_gives_the_local_neighbors(tmp_path, bucket, capsys):
    data = tmp_path / "prep"
    write_prepared(data, 40, drop_image_every=5)
    rng = np.random.default_rng(5)
    groups, g = rng.normal(size=(4, 16)), rng.integers(0, 4, 40)
    (data / "embeddings").mkdir()
    for side in ("text", "image"):
        np.save(data / "embeddings" / f"{side}.npy", groups[g] + 0.6 * rng.normal(size=(40, 16)))
    common = ["--config", str(TINY), f"data.dir={data}", "retrieval.encoder=npy",
              "retrieval.query_text_dropout=0", "retrieval.pool=3"]
    dirs = {"local": str(tmp_path / "ret"), "gs": f"{bucket}/ret"}
    for where, root in dirs.items():
        args = [*common, f"retrieval.dir={root}"]
        for command in (["index"], ["neighbors"]):
            code, _, err = run_cli(capsys, *command, *args)
            assert code == 0, f"{where} {command}: {err}"
    tables = {}
    for where, root in dirs.items():
        r = storage.path(root)
        tables[where] = [np.load(f) for f in (r.joinpath(n).open("rb")
                                              for n in ("neighbors.npy", "scores.npy"))]
        tables[where].append(json.loads((r / "manifest.json").read_text()))
    np.testing.assert_array_equal(tables["gs"][0], tables["local"][0])
    np.testing.assert_array_equal(tables["gs"][1], tables["local"][1])
    assert tables["gs"][0].shape == (40, 6)
    manifests = [tables[where][2] for where in dirs]
    for m, root in zip(manifests, dirs.values()):
        assert m.pop("retrieval").pop("dir") == root
        for timing in ("seconds", "documents_per_second", "index"):
            m.pop(timing)
    assert manifests[0] == manifests[1]
    # shards on gs:// merge into the same table
    args = [*common, f"retrieval.dir={dirs['gs']}"]
    for shard in range(2):
        code, _, err = run_cli(capsys, "neighbors", *args, "--shard", str(shard),
                               "--num-shards", "2")
        assert code == 0, err
    storage.path(f"{dirs['gs']}/neighbors.npy").unlink()
    code, _, err = run_cli(capsys, "neighbors", *args, "--merge", "2")
    assert code == 0, err
    with storage.path(f"{dirs['gs']}/neighbors.npy").open("rb") as f:
        np.testing.assert_array_equal(np.load(f), tables["local"][0])


@pytest.mark.slow
def test_generate_from_a_gs_export_writes_to_gs_as_locally(run, bucket, tmp_path, capsys):
    from PIL import Image

    from cm3leon_jax.tokenizers.image import ImageTokenizer
    from cm3leon_jax.tokenizers.text import train_text_tokenizer

    cfg = load_config(CONFIGS / "tiny.yaml", RUN)
    data = DataDir(tmp_path / "data")
    train_text_tokenizer(["a red square", "a blue circle on the left", "two green crosses"],
                         320).save(data.text_tokenizer)
    ImageTokenizer.create(cfg.vqgan, seed=0, batch_size=4).save(data.image_tokenizer)
    exports = {"local": str(tmp_path / "export"), "gs": f"{bucket}/export"}
    for root in exports.values():
        code, _, err = run_cli(capsys, "export", "--workdir", str(run), "--format",
                               "safetensors", "--out", root, "--skip-tokenizers")
        assert code == 0, err
        tokenizers.copy_tokenizers(data.root, ExportDir(root).tokenizers)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "in.png")
    storage.copy(tmp_path / "in.png", f"{bucket}/in.png")
    outs = {"local": str(tmp_path / "out.png"), "gs": f"{bucket}/samples/out.png"}
    images = {"local": str(tmp_path / "in.png"), "gs": f"{bucket}/in.png"}
    captions = {}
    for where in exports:
        code, _, err = run_cli(capsys, "generate", "image", "--workdir", exports[where],
                               "--prompt", "a red square", "--num", "2", "--out", outs[where],
                               "generate.temperature=0")
        assert code == 0, err
        code, out, err = run_cli(capsys, "generate", "caption", "--workdir", exports[where],
                                 "--image", images[where], "generate.temperature=0",
                                 "generate.max_text_tokens=6")
        assert code == 0, err
        captions[where] = out.split("\t", 1)[1]
    for name in ("out.png", "out.npy"):
        local = (tmp_path / name).read_bytes()
        assert storage.path(f"{bucket}/samples/{name}").read_bytes() == local
    assert captions["gs"] == captions["local"]


@pytest.mark.slow
def test_builtin_encoder_index_and_neighbors_on_gs(tmp_path, bucket, capsys):
    from cm3leon_jax.retrieval.train_encoder import INFO, load_encoder, save_encoder

    data = tmp_path / "prep"
    write_prepared(data, 48, seed=1)
    common = ["--config", str(TINY), f"data.dir={data}", "retrieval.train_steps=2",
              "retrieval.train_batch_size=16", "retrieval.embed_batch=16",
              "retrieval.width=32", "retrieval.embed_dim=16", "retrieval.text_layers=1",
              "mesh.fsdp=-1"]
    dirs = {"local": str(tmp_path / "ret"), "gs": f"{bucket}/ret"}
    code, _, err = run_cli(capsys, "retrieval", "train-encoder", *common,
                           f"retrieval.dir={dirs['local']}")
    assert code == 0, err
    # the trained encoder saved to gs:// reads back as the same weights
    local = load_encoder(tmp_path / "ret" / "encoder", batch=16)
    info = json.loads((tmp_path / "ret" / "encoder" / INFO).read_text())
    save_encoder(f"{dirs['gs']}/encoder", local.params, info)
    remote = load_encoder(f"{dirs['gs']}/encoder", batch=16)
    for a, b in zip(jax.tree.leaves(local.params), jax.tree.leaves(remote.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tables = {}
    for where, root in dirs.items():  # index + neighbors, the embedding caches on gs://
        for command in ("index", "neighbors"):
            code, _, err = run_cli(capsys, command, *common, f"retrieval.dir={root}")
            assert code == 0, f"{where} {command}: {err}"
        with storage.path(f"{root}/neighbors.npy").open("rb") as f:
            tables[where] = np.load(f)
    np.testing.assert_array_equal(tables["gs"], tables["local"])
    assert storage.path(f"{dirs['gs']}/queries").is_dir()


def test_export_into_a_bucket_root_is_refused(tmp_path):
    """`OUT.partial` beside a bucket root would be another bucket: refused before any I/O."""
    from cm3leon_jax.config import ConfigError
    from cm3leon_jax.export.write import export

    with pytest.raises(ConfigError, match=r"--out gs://some-bucket is a bucket: export into a "
                                          r"folder of it \(gs://some-bucket/export\)"):
        export(tmp_path / "run", "gs://some-bucket/", "safetensors")
