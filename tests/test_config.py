import dataclasses

import pytest

from cm3leon_jax.config import (Config, ConfigError, MeshConfig, SweepSize, from_dict,
                                load_config)
from cm3leon_jax.config.cli import key_table
from conftest import CONFIGS, run_cli


def test_yaml_and_overrides(tiny):
    cfg = tiny("train.steps=50", "mesh.fsdp=2", "optimizer.lr=1e-3", "model.qk_norm=true",
               "optimizer.decay_steps=null")
    assert cfg.train.steps == 50 and cfg.mesh.fsdp == 2
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.qk_norm is True and cfg.optimizer.decay_steps is None
    assert cfg.model.d_model == 64  # from the file


def test_int_accepted_for_float(tiny):
    assert tiny("optimizer.lr=1").optimizer.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("model.widht=3", "unknown config key 'model.widht'"),
    ("modle.width=3", "unknown config key 'modle'"),
    ("model.n_layers=2.5", "model.n_layers=2.5: expected an integer"),
    ("model.n_layers=true", "model.n_layers=True: expected an integer"),
    ("model.qk_norm=1", "model.qk_norm=1: expected true or false"),
    ("optimizer.lr=fast", "optimizer.lr='fast': expected a number"),
    ("model.activation=swish", "model.activation='swish' is not one of ['relu', 'gelu']"),
    ("model.n_heads=5", "model.n_heads=5 does not divide model.d_model=64"),
    ("model.n_layers=0", "model.n_layers=0 must be > 0"),
    ("data.seq_len=256", "data.seq_len=256 exceeds model.max_seq_len=128"),
    ("train.grad_accum=3", "train.grad_accum=3 does not divide train.batch_size=8"),
    ("optimizer.warmup_steps=500", "optimizer.warmup_steps=500 exceeds the schedule"),
    ("mesh.tensor=0", "mesh.tensor=0 must be a positive size or -1"),
    ("model.logits_chunk=48", "model.logits_chunk=48 does not divide data.seq_len=128"),
    ("vocab.image_size=0", "vocab.image_size must be >= 1"),
    ("train.steps", "is not of the form section.key=value"),
])
def test_bad_values_name_the_key(tiny, override, message):
    with pytest.raises(ConfigError) as e:
        tiny(override)
    assert message in str(e.value)


def test_device_checks():
    path = CONFIGS / "tiny.yaml"
    load_config(path, ["mesh.data=2", "mesh.fsdp=4"], num_devices=8)
    with pytest.raises(ConfigError, match=r"mesh: data=2 x fsdp=2 x tensor=1 = 4 does not match the 8 devices"):
        load_config(path, ["mesh.data=2", "mesh.fsdp=2"], num_devices=8)
    with pytest.raises(ConfigError, match=r"train.batch_size=12 / train.grad_accum=1 = 12 .* mesh.data x mesh.fsdp = 8"):
        load_config(path, ["train.batch_size=12"], num_devices=8)
    with pytest.raises(ConfigError, match=r"model.n_heads=4 is not divisible by mesh.tensor=8"):
        load_config(path, ["mesh.fsdp=1", "mesh.tensor=8"], num_devices=8)
    with pytest.raises(ConfigError, match="devices are not divisible"):
        load_config(path, ["mesh.data=3"], num_devices=8)


def test_mesh_fill():
    assert MeshConfig(2, -1, 2).shape(8) == (2, 2, 2)
    assert MeshConfig(1, -1, 1).shape(1) == (1, 1, 1)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(bad)


@pytest.mark.parametrize("name", [None, *sorted(str(p.relative_to(CONFIGS))
                                                for p in CONFIGS.rglob("*.yaml"))])
def test_shipped_configs_and_the_defaults_load(name):
    load_config(CONFIGS / name if name else None)


def test_digest_changes_with_any_value(tiny):
    assert tiny().digest() == tiny().digest()
    assert tiny().digest() != tiny("data.seed=1").digest()


def test_renamed_key_moves_to_its_new_name(tiny):
    assert tiny("data.retrieval_dir=null") == tiny()
    assert tiny("data.retrieval_dir=/a").retrieval.dir == "/a"
    assert tiny("data.retrieval_dir=/a", "retrieval.dir=/a").retrieval.dir == "/a"
    with pytest.raises(ConfigError, match="old name of retrieval.dir.*disagree"):
        tiny("data.retrieval_dir=/a", "retrieval.dir=/b")
    assert tiny("data.rotation=0.3").data.whole_segment == 0.3
    assert tiny("retrieval.k=3").retrieval.pool == 3
    assert tiny("retrieval.max_score=0.8").retrieval.max_text_score == 0.8


def test_removed_key_is_refused_in_a_config_and_dropped_from_saved_ones(tiny):
    with pytest.raises(ConfigError, match=r"sft.enabled was removed: `cm3leon sft` trains"):
        tiny("sft.enabled=true")
    saved = tiny().to_dict()
    saved["sft"]["enabled"] = True  # a run directory written before the removal
    assert from_dict(saved, saved=True) == tiny()
    with pytest.raises(ConfigError, match=r"retrieval.max_pair_score was removed: duplicates "
                                          "among the chosen"):
        tiny("retrieval.max_pair_score=0.9")


SHIPPED = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_config_show_round_trips_every_shipped_config(name, tmp_path, capsys):
    """`cm3leon config show` prints YAML that loads back to the same config."""
    want = load_config(CONFIGS / name, ["train.seed=7"])
    code, out, err = run_cli(capsys, "config", "show", "--config", str(CONFIGS / name),
                             "train.seed=7")
    assert code == 0, err
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(tmp_path / "shown.yaml") == want


def test_every_key_is_listed_with_its_meaning(capsys):
    """`cm3leon config keys` names every field of every section, each with a meaning."""
    code, out, _ = run_cli(capsys, "config", "keys")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    want = {f"{f.name}.{k.name}" for f in dataclasses.fields(Config)
            for k in dataclasses.fields(type(getattr(Config(), f.name)))}
    want |= {f"sweep.sizes[].{k.name}" for k in dataclasses.fields(SweepSize)}
    assert listed == want
    undocumented = [line for line in out.splitlines() if line.startswith("  ")
                    and line.rstrip().endswith("#")]
    assert not undocumented, undocumented
    code, out, _ = run_cli(capsys, "config", "keys", "model")
    assert code == 0 and "model.d_model" in out and "train.steps" not in out
    assert run_cli(capsys, "config", "keys", "modle")[0] == 2


def test_docs_config_reference_is_current():
    """docs/config.md ends with `cm3leon config keys --markdown` (when a key changes, replace
    the page's generated part with the command's output)."""
    page = (CONFIGS.parent / "docs" / "config.md").read_text()
    assert key_table(markdown=True) in page


def test_a_shipped_config_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.yaml") == load_config(CONFIGS / "tiny.yaml")
    assert load_config("configs/scaling/cpu.yaml").sweep.sizes
    with pytest.raises(ConfigError, match="does not exist.*shipped configs: .*tiny.yaml"):
        load_config("configs/tiyn.yaml")


@pytest.mark.parametrize("text, message", [
    ("optimizer:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", r"c.yaml: line 3: key 'lr' is given twice"),
    ("train: !!python/object:os.system {}\n", r"c.yaml: line 1 is not valid YAML \(could not "
                                              r"determine a constructor"),
    ("train: [1,\n", r"c.yaml: line 2 is not valid YAML"),
    ("optimizer:\n  lr: .nan\n", r"optimizer.lr=nan: expected a finite number"),
])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=.nan", r"optimizer.lr=nan: expected a finite number"),
    ("optimizer.lr=.inf", r"optimizer.lr=inf: expected a finite number"),
    ("optimizer.lr=[1,", r"override 'optimizer.lr=\[1,': the value is not valid YAML"),
])
def test_bad_override_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
