"""Tests run on 8 host CPU devices, so sharding is exercised on every run."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from cm3leon_jax.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Many tests build the same small programs; the persistent cache compiles each once per run.
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture
def tiny():
    """The tiny config with overrides: tiny("train.steps=5", ...)."""
    return lambda *overrides: load_config(CONFIGS / "tiny.yaml", list(overrides))


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `cm3leon ARGV`, argparse's own exits included."""
    from cm3leon_jax import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
