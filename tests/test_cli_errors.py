"""Bad input at the command line: one line naming the problem, exit 2, no traceback; the
traceback with --debug."""

import numpy as np
import pytest

from cm3leon_jax.data.records import write_documents
from conftest import CONFIGS, run_cli

TINY = str(CONFIGS / "tiny.yaml")


def _truncated_export(tmp_path):
    """A real export of a 1-step run whose model.safetensors lost its second half."""
    from cm3leon_jax.config import load_config
    from cm3leon_jax.export.write import export
    from cm3leon_jax.train.trainer import train

    train(load_config(TINY, ["train.steps=1", "optimizer.warmup_steps=1"]), tmp_path / "run")
    export(tmp_path / "run", tmp_path / "exp", "safetensors")
    weights = tmp_path / "exp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return tmp_path / "exp"


def _bad_inputs(tmp_path):
    (tmp_path / "dup.yaml").write_text("train:\n  steps: 3\n  steps: 4\n")
    (tmp_path / "broken.yaml").write_text("train: [1,\n")
    (tmp_path / "object.yaml").write_text("train: !!python/object:os.system {}\n")
    half = tmp_path / "half"  # a prepared directory whose manifest lost a shard
    write_documents(half, [[{"id": "a", "caption": "", "text": [], "image": []}]] * 2)
    (half / "documents" / "shard-00001-of-00002.array_record").unlink()
    np.save(tmp_path / "tokens.npy", np.zeros((2, 4), np.int32))
    (tmp_path / "empty").mkdir()
    (tmp_path / "not.npy").write_bytes(b"not an array")
    exp = _truncated_export(tmp_path)
    return {
        "missing config": (["params", "--config", str(tmp_path / "nope.yaml")],
                           "nope.yaml does not exist"),
        "duplicate key": (["params", "--config", str(tmp_path / "dup.yaml")],
                          "key 'steps' is given twice"),
        "broken yaml": (["params", "--config", str(tmp_path / "broken.yaml")],
                        "is not valid YAML"),
        "python tag": (["params", "--config", str(tmp_path / "object.yaml")],
                       "could not determine a constructor"),
        "nan value": (["params", "--config", TINY, "optimizer.lr=.nan"],
                      "optimizer.lr=nan: expected a finite number"),
        "no data dir": (["train", "--config", TINY, "--workdir", str(tmp_path / "r1"),
                         f"data.dir={tmp_path / 'absent'}"], "absent' is not a directory"),
        "deleted shard": (["train", "--config", TINY, "--workdir", str(tmp_path / "r2"),
                           f"data.dir={half}"], "shard-00001-of-00002.array_record of the "
                                                "manifest is missing"),
        "no run": (["score", "--workdir", str(tmp_path / "norun"), "--tokens",
                    str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "o.npy")],
                   "norun"),
        "not inception weights": (["eval", "fid", "--real", str(tmp_path / "empty"), "--fake",
                                   str(tmp_path / "empty"), "--inception-weights",
                                   str(tmp_path / "tokens.npy")],
                                  "tokens.npy: cannot read the Inception weights"),
        "unsupported url": (["train", "--config", TINY, "--workdir", "ftp://host/run"],
                            "ftp://host/run: unsupported storage scheme"),
        "export into a bucket root": (["export", "--workdir", str(tmp_path / "run"), "--out",
                                       "gs://bucket", "--format", "safetensors"],
                                      "--out gs://bucket is a bucket"),
        "truncated export": (["score", "--workdir", str(exp), "--tokens",
                              str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "o.npy")],
                             "model.safetensors is not a readable safetensors file"),
        "tokens not npy": (["score", "--workdir", str(exp), "--tokens",
                            str(tmp_path / "not.npy"), "--out", str(tmp_path / "o.npy")],
                           "not.npy: not a .npy array"),
        "beam flag": (["prepare", "--config", TINY, f"data.dir={tmp_path / 'p'}",
                       "prepare.runner=beam", "prepare.beam_options=[DirectRunner]"],
                      "'DirectRunner' is not a pipeline flag"),
        "index shards": (["index", "--config", TINY, f"data.dir={tmp_path / 'p'}",
                          "retrieval.index_shards=0"], "retrieval.index_shards=0 must be"),
        **{f"lpips files, {cmd}": ([cmd, *where, "--config", TINY, f"data.dir={tmp_path / 'l'}",
                                    "vqgan_train.perceptual_weight=1",
                                    f"vqgan_train.lpips_vgg={tmp_path / 'vgg.pth'}",
                                    f"vqgan_train.lpips_heads={tmp_path / 'not.npy'}"],
                                   "vqgan_train.lpips_vgg=")  # before any rendering or reading
           for cmd, where in (("tokenizer", ["train-image", "--workdir", str(tmp_path / "v")]),
                              ("prepare", []))},
    }


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    for name, (argv, needle) in _bad_inputs(tmp_path).items():
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (name, code, err)
        assert "Traceback" not in err, (name, err)
        last = err.strip().splitlines()[-1]  # after any progress lines, the one error line
        assert last.startswith(f"cm3leon {argv[0]}: ") and needle in last, (name, err)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["params", "--config", str(tmp_path / "nope.yaml")]
    with pytest.raises(Exception, match="nope.yaml does not exist"):
        run_cli(capsys, *argv, "--debug")
    monkeypatch.setenv("CM3LEON_DEBUG", "1")
    with pytest.raises(Exception, match="nope.yaml does not exist"):
        run_cli(capsys, *argv)


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    """A checkpoint save that fills the disk (a 3.5 MB tmpfs holds one tiny checkpoint):
    one line saying so, exit 1 (not bad input), no traceback, the previous checkpoint
    intact and loadable."""
    import subprocess

    from cm3leon_jax.train import weights

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3500k", "tmpfs", str(small)],
                      capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        code, _, err = run_cli(capsys, "train", "--config", TINY, "--workdir",
                               str(small / "run"), "train.steps=8", "train.checkpoint_every=2",
                               "optimizer.warmup_steps=1")
        assert code == 1, err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("cm3leon train: disk full: "), err
        saved = weights.load(small / "run")
        assert saved.step == 2 and saved.origin.endswith("checkpoints/2")
    finally:
        subprocess.run(["umount", str(small)], check=True)
