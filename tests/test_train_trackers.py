"""train.trackers: metrics.jsonl always, TensorBoard and Weights & Biases on request, each
sent the same record; a resumed run logs to the same W&B run. W&B runs offline here
(WANDB_MODE=offline); its run file is read back record by record."""

import glob
import json
import struct

import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.train.metrics import EVAL_KEYS, TB_KEYS
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.trainer import train

SMALL = ["model.n_layers=1", "data.seq_len=32", "train.batch_size=8", "optimizer.warmup_steps=1",
         "train.progress=log"]


def wandb_records(path: str) -> list:
    """The protobuf records of a W&B run file: a 7-byte header, then 32 KiB blocks of
    LevelDB-log chunks (crc32 4, length 2, type 1: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def history(run_file: str) -> dict[int, dict]:
    rows = {}
    for r in wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                     for i in r.history.item}
            rows[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


@pytest.mark.slow
def test_wandb_gets_every_logged_scalar_and_a_resume_continues_its_run(tiny, tmp_path,
                                                                       monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = lambda steps: tiny(*SMALL, f"train.steps={steps}", "train.eval_every=0",
                             "train.trackers=[tensorboard, wandb]", "train.wandb_project=t")
    train(cfg(4), run)
    run_id = (run / "wandb_id").read_text().strip()
    train(cfg(6), run)  # resumes from step 4's checkpoint
    assert (run / "wandb_id").read_text().strip() == run_id
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2  # both starts logged to the run of the stored id
    got = {**history(files[0]), **history(files[1])}
    want = {r["step"]: {f"train/{k}": r[k] for k in TB_KEYS if r.get(k) is not None}
            | {f"eval/{k[5:]}": r[k] for k in EVAL_KEYS if r.get(k) is not None}
            for r in read_metrics(run)}
    assert sorted(want) == list(range(1, 7)) and got == want
    config = next(r.run.config for r in wandb_records(files[0])
                  if r.WhichOneof("record_type") == "run")
    values = {i.key: json.loads(i.value_json) for i in config.update}
    assert values["train"] == json.loads(json.dumps(cfg(4).to_dict()["train"]))  # resolved
    assert (run / "tensorboard").is_dir()


def test_metrics_jsonl_alone_without_trackers(tiny, tmp_path):
    run = tmp_path / "run"
    train(tiny(*SMALL, "train.steps=2", "train.trackers=[]"), run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert not (run / "tensorboard").exists() and not (run / "wandb_id").exists()


@pytest.mark.parametrize("trackers", ["[tensorboard, mlflow]", "[wandb, wandb]"])
def test_trackers_are_checked_when_the_config_loads(tiny, trackers):
    with pytest.raises(ConfigError, match=r"train.trackers=.*each of \['tensorboard', "
                                          r"'wandb'\] at most once"):
        tiny(f"train.trackers={trackers}")
