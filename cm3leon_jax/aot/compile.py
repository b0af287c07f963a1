"""Compiling a lowered step for a TPU pod that is not attached: the TPU compiler's
out-of-memory refusals become `DoesNotFit` with advice, and byte counts read as people
read them. Shared by the train-step and generation-step compilers of this package.
"""

from __future__ import annotations

import re

from cm3leon_jax.aot.topology import GiB


class DoesNotFit(Exception):
    """The compiled step needs more HBM per chip than the chip has."""


_SIZE = r"([0-9.]+)([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OOM = (  # libtpu's two ways of saying it; (what, needed, available)
    (re.compile(rf"memory required for HLO temporaries \({_SIZE}\) exceeds available HBM "
                rf"\({_SIZE}\)"), "temporaries (activations, gradients, updates) alone need"),
    (re.compile(rf"Used {_SIZE} of {_SIZE} hbm"), "the step needs"),
)


def compile_or_explain(lowered, explain):
    """`lowered.compile()`; the TPU compiler's out-of-memory error (a JaxRuntimeError)
    becomes DoesNotFit with `explain(what, bytes needed, bytes available)` as its message."""
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - only an out-of-memory message is translated
        oom = _parse_oom(str(e))
        if oom is None:
            raise
        raise DoesNotFit(explain(*oom)) from None


def _parse_oom(message: str) -> tuple[str, int, int] | None:
    """(what, bytes needed, bytes available) from the TPU compiler's out-of-memory error."""
    for pattern, what in _OOM:
        m = pattern.search(message)
        if m:
            need = float(m.group(1)) * _UNITS[m.group(2)]
            have = float(m.group(3)) * _UNITS[m.group(4)]
            return what, int(need), int(have)
    return None


def human_bytes(b: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"
