"""Published torch weight files as named numpy arrays, for the networks of this package.

One reader for every state dict the perception networks load (the FID Inception, LPIPS):
a torch `.pth` / `.pt` (unpickled by torch, which stays optional: only these need it), or
the same names in an `.npz` or `.safetensors` file, which need no torch (`save_npz` writes
one). Local or on cloud storage (storage.py). `checked` then holds the names and shapes to
what a network expects, so a wrong file fails at load with its name, not inside a forward.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from cm3leon_jax import storage


def read_state_dict(path: storage.PathLike, what: str, expected_files: str) -> dict:
    """The name -> numpy array dict in `path` (.pth, .pt, .npz or .safetensors).

    `what` names the weights in errors ("the Inception weights"), `expected_files` the
    files a user should give when `path` does not exist."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file ({expected_files})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pth", ".pt"):
            try:
                import torch  # optional: only .pth files need torch
            except ImportError as e:
                raise ValueError("reading a .pth needs torch; convert it once where torch "
                                 "is installed (save_npz) and load the .npz") from e
            with path.open("rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict")
            return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v
                    for k, v in state.items()}
        if suffix == ".npz":
            with path.open("rb") as f, np.load(f) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix == ".safetensors":
            return safetensors.numpy.load(path.read_bytes())
        raise ValueError("unsupported weight file type (expected .pth, .pt, .npz or "
                         ".safetensors)")
    except Exception as e:  # any reader failure: say which file
        raise ValueError(f"{path}: cannot read {what}: {e}") from e


def checked(arrays: dict, expected: dict, source: str, what: str,
            optional: dict | None = None) -> dict:
    """Named arrays -> float32 jax arrays, refusing a missing, unknown or misshapen name.

    `expected` and `optional` map names to shapes (`optional` ones are kept when present);
    errors start with `source` and say the file is not `what`."""
    known = {**expected, **(optional or {})}
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(known))
    if missing or unknown:
        parts = []
        for label, names in (("missing", missing), ("unknown", unknown)):
            if names:
                parts.append(f"{label} {len(names)} key(s): {', '.join(names[:5])}"
                             + (", ..." if len(names) > 5 else ""))
        raise ValueError(f"{source}: not {what}: {'; '.join(parts)}")
    params = {}
    for key, value in arrays.items():
        value = np.asarray(value, np.float32)
        if value.shape != known[key]:
            raise ValueError(f"{source}: {key} has shape {value.shape}, expected "
                             f"{known[key]}")
        params[key] = jnp.asarray(value)
    return params


def save_npz(arrays: dict, path: storage.PathLike) -> None:
    """Named arrays (torch's names) as an .npz that `read_state_dict` reads without torch."""
    with storage.path(path).open("wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
