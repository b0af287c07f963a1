"""Per-step metrics: `metrics.jsonl` (one JSON object per step, always: resume, the demo and
the sweeps read it), and the trackers of `train.trackers` (TensorBoard; Weights & Biases,
resumed by the id in RUN/wandb_id), each sent the same record; plus MFU, and the progress
shown while training (a tqdm bar, or plain lines for logs).

Only process 0 writes. On resume, lines past the restored step (steps that were run but
not checkpointed before a stop) are dropped, because the run does them again. Objects in
cloud storage cannot be appended to: there the file is rewritten at every `flush` (each
checkpoint and the end), which loses nothing a resume would keep, and TensorBoard writes
its events file into a local folder uploaded at the same times (through storage.py, not
tensorboardX's own GCS writer, which uploads again when collected).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import sys
import tempfile
from pathlib import Path as LocalPath

import jax
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.layout import RunDir

# Dense bf16 matmul peak per device, TFLOP/s (datasheet, no sparsity).
PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}
TB_KEYS = ("loss", "text_loss", "image_loss", "z_loss", "grad_norm", "lr", "tokens_per_s",
           "real_tokens_per_s", "mfu")
EVAL_KEYS = ("eval_loss", "eval_text_loss", "eval_image_loss")  # TensorBoard eval/loss, ...


def device_peak_tflops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None,
        num_devices: int) -> float | None:
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * num_devices)


def host_metrics(step: int, device_metrics: dict) -> dict:
    """Device scalars -> JSON-ready floats; modality losses are null with no such tokens."""
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    out = {"step": step}
    for k, v in m.items():
        if k in ("text_tokens", "image_tokens"):
            continue
        out[k] = v if math.isfinite(v) else None
    for kind in ("text", "image"):
        if m[f"{kind}_tokens"] == 0:
            out[f"{kind}_loss"] = None
    return out


def _complete(line: str) -> bool:
    """False for the half-written last line a killed run can leave."""
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


class MetricsWriter:
    def __init__(self, run: RunDir, resume_step: int, enabled: bool,
                 trackers: tuple[str, ...] = ("tensorboard",), config: dict | None = None,
                 wandb_project: str = "cm3leon"):
        self.enabled = enabled
        self.path = run.metrics
        self.tb = self.wandb = None
        self.remote = storage.is_remote(self.path)
        self.lines: list[str] = []  # remote: the whole file, rewritten at each flush
        self.tb_dir = run.tensorboard
        if not enabled:
            return
        if self.path.exists():
            self.lines = [line + "\n" for line in self.path.read_text().splitlines()
                          if _complete(line) and json.loads(line)["step"] <= resume_step]
            storage.write_text_atomic(self.path, "".join(self.lines))
        if "tensorboard" in trackers:
            from tensorboardX import SummaryWriter  # optional: benchmarks import this module without it

            self.tb_local = (LocalPath(tempfile.mkdtemp(prefix="cm3leon-tb-")) if self.remote
                             else storage.local(self.tb_dir))
            self.tb = SummaryWriter(str(self.tb_local), purge_step=resume_step + 1)
        if "wandb" in trackers:
            self.wandb = _wandb_run(run, config or {}, wandb_project)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            storage.append_text(self.path, line)
        scalars = {**{f"train/{k}": record[k] for k in TB_KEYS if record.get(k) is not None},
                   **{f"eval/{k[5:]}": record[k] for k in EVAL_KEYS if record.get(k) is not None}}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
        self._upload()

    def _upload(self) -> None:
        if self.remote:
            self.path.write_text("".join(self.lines))
            if self.tb is not None:
                storage.copy(self.tb_local, self.tb_dir)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self._upload()
            if self.remote:
                shutil.rmtree(self.tb_local)
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(run: RunDir, config: dict, project: str):
    """A W&B run named after the run directory, resumed by the id a first start stored in
    RUN/wandb_id; its local files go to the run directory (a temporary folder for a bucket).
    WANDB_MODE (online, offline, disabled) is W&B's own switch."""
    import wandb  # optional: train.trackers lists wandb (checked when the config loads)

    if run.wandb_id.exists():
        run_id = run.wandb_id.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
        storage.write_text_atomic(run.wandb_id, run_id + "\n")
    local = (tempfile.mkdtemp(prefix="cm3leon-wandb-") if storage.is_remote(run.root)
             else str(storage.local(run.root)))
    return wandb.init(project=project, name=run.root.name, id=run_id, resume="allow",
                      dir=local, config=config)


def progress_line(record: dict, total: int) -> str:
    """One plain line for a log: step, loss, throughput, MFU (when known), held-out loss."""
    loss = record.get("loss")
    parts = [f"step {record['step']}/{total}",
             f"loss {loss:.4f}" if loss is not None else "loss non-finite (update skipped)",
             f"{record['tokens_per_s']:,.0f} tokens/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("eval_loss") is not None:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    return "  ".join(parts)


class Progress:
    """`train.progress`: a tqdm bar (`bar`), or for files and pipes one plain line per
    logged step on stdout (`log`; no carriage returns to garble a log); `auto` shows the bar
    when stdout is a terminal. Only where `enabled` (process 0)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool, stream=None):
        stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.lines = enabled and mode == "log"
        self.total, self.stream = total, stream
        self.bar = tqdm(total=total, initial=initial, desc="train",
                        disable=not enabled or mode != "bar", dynamic_ncols=True)

    def update(self, record: dict, logged: bool) -> None:
        """After each step; `logged`: the step's line went to metrics.jsonl."""
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None
                             else "non-finite")
        if self.lines and logged:
            print(progress_line(record, self.total), file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()


def read_metrics(workdir: storage.PathLike) -> list[dict]:
    path = RunDir(workdir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line]
