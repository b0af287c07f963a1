"""Keep CPU (and GPU) runs unaffected by an installed libtpu (the `tpu` extra).

With libtpu installed, JAX tries a TPU backend on every start; on a host without TPU chips
that attempt fails after libtpu prints warnings about `TPU_ACCELERATOR_TYPE` and
`TPU_WORKER_HOSTNAMES`. `describe_host_without_tpu` runs when the package is imported,
before any backend starts, and only on hosts with no TPU chip on the PCI bus:
- it gives libtpu a placeholder host description so it stays quiet, and lets several
  processes load it at once (libtpu is then used
  only for ahead-of-time compilation, `cm3leon compile`, whose devices come from the
  topology named on the command line, not from these variables);
- when JAX_PLATFORMS is unset and there is no GPU either, it sets JAX_PLATFORMS=cpu, so
  JAX does not try the TPU backend at all.
Variables already set are never changed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU PCI ids, as jax._src.hardware_utils (v3 ... TPU7x)
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def host_has_tpu() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if (Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and
                    Path(vendor).with_name("device").read_text().strip() in _TPU_PCI_DEVICES):
                return True
        except OSError:
            continue
    return False


def describe_host_without_tpu() -> None:
    if importlib.util.find_spec("libtpu") is None or host_has_tpu():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No chip to guard: let several processes compile at once (else libtpu's lock file
    # /tmp/libtpu_lockfile admits one).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "JAX_PLATFORMS" not in os.environ and not any(map(os.path.exists, _GPU_DEVICE_FILES)):
        os.environ["JAX_PLATFORMS"] = "cpu"
