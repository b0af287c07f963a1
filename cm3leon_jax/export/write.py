"""`cm3leon export`: one checkpoint of a run -> a self-contained export directory.

Everything that can be refused is refused from the saved config alone (format options,
missing tokenizers, an occupied output directory) before any array is read. The directory
is written as `OUT.partial` and renamed at the end, so an interrupted export never looks
complete. OUT may be on cloud storage (storage.py), where the rename is a copy and a delete
per file, `config.json` last: an interrupted move leaves an OUT without it, which nothing
reads as an export (remove OUT and export again).
"""

from __future__ import annotations

import json
import time

import jax
from jax.sharding import Mesh

from cm3leon_jax import storage
from cm3leon_jax.config import ConfigError
from cm3leon_jax.export import hf_opt, tensor_file, tokenizers
from cm3leon_jax.export import safetensors as st
from cm3leon_jax.layout import ExportDir
from cm3leon_jax.train import weights as weights_lib

FORMATS = ("safetensors", "hf-opt")


def export(workdir: storage.PathLike, out: storage.PathLike, fmt: str, step: int | None = None,
           mesh: Mesh | None = None, with_tokenizers: bool = True,
           piece_bytes: int = tensor_file.PIECE_BYTES) -> dict:
    """Write the export; returns a summary (also printed)."""
    t0 = time.perf_counter()
    out = storage.path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    if storage.is_remote(out) and "/" not in str(out).split("://", 1)[1].strip("/"):
        raise ConfigError(f"--out {out} is a bucket: export into a folder of it "
                          f"({str(out).rstrip('/')}/export)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory")
    cfg, step, _ = weights_lib.saved_config(workdir, step)
    if fmt == "hf-opt":
        hf_opt.check(cfg)
    found = weights_lib.tokenizer_dir(cfg, workdir) if with_tokenizers else None
    data_dir = found[0] if found else None
    if data_dir is not None:
        tokenizers.tokenizer_entries(data_dir, found[1])  # refuses a missing directory now

    weights = weights_lib.load(workdir, step, mesh=mesh)
    if fmt == "safetensors":
        files = st.tensors(weights.params, weights.mesh, piece_bytes)
        metadata = {"format": weights_lib.FORMAT}
    else:
        files = hf_opt.tensors(cfg, weights.params, weights.mesh)
        metadata = {"format": "pt"}  # transformers checks this key

    lead = jax.process_index() == 0
    partial = ExportDir(out.with_name(out.name + ".partial"))
    if lead:
        partial.root.rmtree(missing_ok=True)
        partial.root.mkdir(parents=True)
    nbytes = tensor_file.write(partial.weights, files, metadata, desc=f"export {fmt}")
    summary = {"format": fmt, "out": str(out), "source": weights.origin, "step": step,
               "tensors": len(files), "bytes": nbytes, "tokenizers": []}
    if lead:
        if data_dir is not None:
            copied = tokenizers.copy_tokenizers(data_dir, partial.tokenizers)
            summary["tokenizers"] = [str(p.relative_to(partial.root)) for p in copied]
        ours = st.config_json(cfg, weights.mdef, step, weights.origin, partial.weights.name)
        ours["tokenizers"] = summary["tokenizers"]
        if fmt == "safetensors":
            partial.config.write_text(json.dumps(ours, indent=2) + "\n")
        else:
            partial.config.write_text(json.dumps(hf_opt.config_json(cfg), indent=2) + "\n")
            partial.provenance.write_text(json.dumps(ours, indent=2) + "\n")
        cfg.vocab.build().save(partial.vocab)
        if out.exists() and not storage.is_remote(out):  # an empty folder (checked above)
            out.rmdir()
        if storage.is_remote(out):  # file by file, config.json (what marks an export) last
            for child in sorted(partial.root.iterdir(), key=lambda p: p.name == "config.json"):
                storage.move_aside(child, out / child.name)
            partial.root.rmtree(missing_ok=True)
        else:
            storage.move_aside(partial.root, out)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        tok = (f"{len(summary['tokenizers'])} tokenizer files from {data_dir}" if data_dir
               else "no tokenizers (none known: the built-in synthetic source)"
               if with_tokenizers else "no tokenizers (--skip-tokenizers)")
        print(f"exported {weights.origin} as {fmt}: {len(files)} tensors, "
              f"{nbytes / 2**20:.1f} MiB -> {out}; {tok}; {summary['seconds']}s")
    return summary
