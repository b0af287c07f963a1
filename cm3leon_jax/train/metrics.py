"""Per-step metrics: `metrics.jsonl` (one JSON object per step) and TensorBoard, plus MFU.

Only process 0 writes. On resume, lines past the restored step (steps that were run but
not checkpointed before a stop) are dropped, because the run does them again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

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
    def __init__(self, run: RunDir, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run.metrics
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if _complete(line) and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter  # optional: benchmarks import this module without it

        self.tb = SummaryWriter(str(run.tensorboard), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key in TB_KEYS:
            if record.get(key) is not None:
                self.tb.add_scalar(f"train/{key}", record[key], record["step"])
        for key in EVAL_KEYS:
            if record.get(key) is not None:
                self.tb.add_scalar(f"eval/{key[5:]}", record[key], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = RunDir(Path(workdir)).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line]
