"""`cm3leon export`: one checkpoint of a run -> a self-contained export directory.

Everything that can be refused is refused from the saved config and the tokenizers alone
(format options, missing tokenizers, a tokenizer transformers cannot hold, an occupied output
directory) before any array is read. The directory
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
from cm3leon_jax.export import hf_opt, hf_tokenizer, model_card, tensor_file, tokenizers
from cm3leon_jax.export import safetensors as st
from cm3leon_jax.layout import ExportDir
from cm3leon_jax.train import weights as weights_lib

FORMATS = ("safetensors", "hf-opt")


def export(workdir: storage.PathLike, out: storage.PathLike, fmt: str, step: int | None = None,
           mesh: Mesh | None = None, with_tokenizers: bool = True,
           piece_bytes: int = tensor_file.PIECE_BYTES, shard_bytes: int | None = None) -> dict:
    """Write the export; returns a summary (also printed). `shard_bytes`: the largest weights
    file of an hf-opt export (default hf_opt.SHARD_BYTES)."""
    t0 = time.perf_counter()
    out = storage.path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    if shard_bytes is not None and fmt != "hf-opt":
        raise ConfigError(f"--shard-bytes is for --format hf-opt; a {fmt} export is one "
                          f"{ExportDir(out).weights.name} (what train.init_from and generate read)")
    shard_bytes = hf_opt.SHARD_BYTES if shard_bytes is None else shard_bytes
    if shard_bytes < 1:
        raise ConfigError(f"--shard-bytes {shard_bytes} must be >= 1 (bytes per weights file)")
    if storage.is_remote(out) and "/" not in str(out).split("://", 1)[1].strip("/"):
        raise ConfigError(f"--out {out} is a bucket: export into a folder of it "
                          f"({str(out).rstrip('/')}/export)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory")
    cfg, step, _ = weights_lib.saved_config(workdir, step)
    found = weights_lib.tokenizer_dir(cfg, workdir) if with_tokenizers else None
    data_dir = found[0] if found else None
    if data_dir is not None:
        tokenizers.tokenizer_entries(data_dir, found[1])  # refuses a missing directory now
    image, hf_files = None, {}
    if fmt == "hf-opt":
        hf_opt.check(cfg)
        if data_dir is not None:  # built (and held to sentencepiece) before any array is read
            image = tokenizers.image_config(data_dir, found[1])
            hf_files = hf_tokenizer.files(cfg, data_dir, image, found[1])

    weights = weights_lib.load(workdir, step, mesh=mesh)
    index = None
    if fmt == "safetensors":
        files = {ExportDir(out).weights.name: st.tensors(weights.params, weights.mesh,
                                                         piece_bytes)}
        metadata = {"format": weights_lib.FORMAT}
    else:
        files, index = hf_opt.shards(hf_opt.tensors(cfg, weights.params, weights.mesh),
                                     shard_bytes)
        metadata = {"format": "pt"}  # transformers checks this key

    lead = jax.process_index() == 0
    partial = ExportDir(out.with_name(out.name + ".partial"))
    if lead:
        partial.root.rmtree(missing_ok=True)
        partial.root.mkdir(parents=True)
    nbytes = sum(tensor_file.write(partial.root / name, group, metadata,
                                   desc=f"export {fmt}" + (f" {name}" if index else ""))
                 for name, group in files.items())
    ntensors = sum(len(group) for group in files.values())
    summary = {"format": fmt, "out": str(out), "source": weights.origin, "step": step,
               "tensors": ntensors, "bytes": nbytes, "files": list(files), "tokenizers": []}
    if lead:
        if data_dir is not None:
            copied = tokenizers.copy_tokenizers(data_dir, partial.tokenizers)
            summary["tokenizers"] = [str(p.relative_to(partial.root)) for p in copied]
        ours = st.config_json(cfg, weights.mdef, step, weights.origin,
                              hf_opt.INDEX if index else next(iter(files)))
        ours["tokenizers"] = summary["tokenizers"]
        if fmt == "safetensors":
            partial.config.write_text(json.dumps(ours, indent=2) + "\n")
            cfg.vocab.build().save(partial.vocab)
        else:
            _write_hf(partial, cfg, ours, index, hf_files, image, weights.origin, step)
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
        tok += ", a transformers tokenizer" if hf_files else ""
        where = f" in {len(files)} files" if index else ""
        print(f"exported {weights.origin} as {fmt}: {ntensors} tensors, "
              f"{nbytes / 2**20:.1f} MiB{where} -> {out}; {tok}; {summary['seconds']}s")
    return summary


def _write_hf(partial: ExportDir, cfg, ours: dict, index: dict | None, hf_files: dict,
              image, origin: str, step: int) -> None:
    """The files of an hf-opt export besides the weights and tokenizers/."""
    partial.config.write_text(json.dumps(hf_opt.config_json(cfg), indent=2) + "\n")
    (partial.root / hf_opt.GENERATION_CONFIG).write_text(
        json.dumps(hf_opt.generation_config(cfg), indent=2) + "\n")
    if index is not None:
        (partial.root / hf_opt.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for name, text in hf_files.items():
        (partial.root / name).write_text(text)
    (partial.root / hf_opt.CARD).write_text(
        model_card.text(cfg, origin, step, image, tokenizer=bool(hf_files)))
    partial.provenance.write_text(json.dumps(ours, indent=2) + "\n")
