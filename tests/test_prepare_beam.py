"""`prepare.runner: beam`: the shard stage on Apache Beam's DirectRunner with two worker
processes writes the same bytes as the local runner (issue 19), and its options are
checked when the config loads."""

import pytest
from test_prepare import config, random_vq  # noqa: F401  (a fixture)
from test_storage_data import tree

from cm3leon_jax.config import ConfigError
from cm3leon_jax.data.prepare import prepare

pytest.importorskip("apache_beam")

BEAM = ["prepare.runner=beam",
        "prepare.beam_options=[--runner=DirectRunner, --direct_num_workers=2, "
        "--direct_running_mode=multi_processing]"]
TIMINGS = ("seconds", "wall_seconds")


@pytest.mark.multiprocess
def test_beam_runner_writes_the_local_runners_bytes(tiny, tmp_path, random_vq):  # noqa: F811
    settings = ["source.size=70", "prepare.shard_size=16", "prepare.batch_size=8",
                f"prepare.image_tokenizer={random_vq}"]
    local = prepare(config(tiny, tmp_path, "local", *settings), progress=False)
    beam = prepare(config(tiny, tmp_path, "beam", *settings, *BEAM), progress=False)
    assert {k: v for k, v in beam.items() if k not in TIMINGS} == {
        k: v for k, v in local.items() if k not in TIMINGS}
    assert "beam_shards" in beam["seconds"]
    a, b = tree(tmp_path / "local"), tree(tmp_path / "beam")
    assert sorted(a) == sorted(b) and len([n for n in a if n.endswith(".array_record")]) == 5
    for name in a:
        if name != "manifest.json":
            assert a[name] == b[name], name


def test_beam_options_are_checked(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"prepare.beam_options: 'DirectRunner' is not a "
                                          r"pipeline flag \(--name=value\)"):
        config(tiny, tmp_path, "x", "prepare.runner=beam", "prepare.beam_options=[DirectRunner]")
    with pytest.raises(ConfigError, match="prepare.beam_options are set but prepare.runner is "
                                          "'local'; set prepare.runner=beam"):
        config(tiny, tmp_path, "x", "prepare.beam_options=[--runner=DirectRunner]")
