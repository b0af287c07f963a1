"""`cm3leon sft-data`, `cm3leon sft` and `cm3leon eval-sft`: their parsers and what they run.

    cm3leon sft-data --config FILE --out DIR [--per-task N] [section.key=value ...]
    cm3leon sft    --config FILE --init RUN_OR_EXPORT --workdir DIR [section.key=value ...]
    cm3leon eval-sft --config FILE --workdir RUN [--workdir RUN ...] [--out DIR] [section.key=value ...]

`cm3leon sft` is the trainer of `cm3leon train` (train/trainer.py) on the SFT mixture's rows
(sft/rows.py), starting from --init's weights (`train.init_from`). Every path may be on
cloud storage (storage.py). Stage modules are imported when a command runs, so
`cm3leon --help` does not load jax.
"""

from __future__ import annotations

import json

from cm3leon_jax import storage
from cm3leon_jax.config import load_config
from cm3leon_jax.config.cli import with_config
from cm3leon_jax.train.cli import run_training


def add_commands(sub) -> None:
    p = with_config(sub.add_parser("sft-data", help="SFT mixture shares and sample examples"))
    p.add_argument("--out", required=True, help="output: samples.jsonl, one PNG per task")
    p.add_argument("--per-task", type=int, default=4, help="sample examples per task")
    p.add_argument("--draws", type=int, default=10000, help="mixture draws for the drawn share")
    p.set_defaults(fn=sft_data)

    p = with_config(sub.add_parser("sft", help="fine-tune on the SFT mixture from a run or "
                                   "export (resumes from DIR)"))
    p.add_argument("--init", required=True, help="run directory (latest checkpoint's "
                   "parameters) or safetensors export to start from")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics")
    p.set_defaults(fn=lambda args: run_training(
        "sft", args.config, [*args.overrides, f"train.init_from={args.init}"], args.workdir,
        sft_data_for))

    p = with_config(sub.add_parser("eval-sft", help="score runs on held-out SFT tasks "
                                   "(caption, VQA, edit, grounding, control)"))
    p.add_argument("--workdir", required=True, action="append", help="a run directory; repeat "
                   "to compare runs (e.g. the pretrained run, then the fine-tuned one)")
    p.add_argument("--out", help="where eval_sft.{json,md,png} go (default: the last run)")
    p.set_defaults(fn=eval_sft)


def sft_data_for(cfg):
    """`data()` of the trainer: this process's rows of the SFT mixture."""
    import jax  # heavy: deferred so cm3leon --help stays fast

    from cm3leon_jax.sft.rows import sft_batches  # heavy: as above

    return lambda: sft_batches(cfg, jax.process_index(), jax.process_count())


def sft_data(args) -> None:
    """The SFT mixture's per-task shares, and sample examples as PNG + JSONL for a look."""
    import numpy as np  # heavy: deferred so cm3leon --help stays fast

    from cm3leon_jax.generate.grid import save_image  # heavy: as above
    from cm3leon_jax.sft.jsonl import SFTDataError, jsonl_example, read_sft_jsonl  # heavy
    from cm3leon_jax.sft.mixture import config_shares, mixture_report  # heavy: as above
    from cm3leon_jax.sft.shapes_suite import ShapesSFT  # heavy: as above

    cfg = load_config(args.config, args.overrides)
    s = cfg.sft
    try:
        shares = config_shares(s)
    except (SFTDataError, ValueError) as e:
        raise SystemExit(f"cm3leon sft-data: {e}") from None
    print(mixture_report(shares, s.seed, args.draws))
    out = storage.path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolution = s.resolution or cfg.vqgan.resolution
    if s.source == "shapes":
        suite = ShapesSFT(s.seed, resolution, s.max_objects)
        examples = {t: [suite.example(t, "train", i) for i in range(args.per_task)]
                    for t in s.tasks}
    else:
        records = [r for f in s.files for r in read_sft_jsonl(f)]
        examples = {t: [jsonl_example(r, resolution, k)
                        for k, r in enumerate(x for x in records if x["task"] == t)
                        if k < args.per_task] for t in s.tasks}
    lines = []
    for task, exs in examples.items():
        rows = []
        for ex in exs:
            images = [seg for seg in ex.segments if not isinstance(seg, str)]
            rows.append(np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)))
                                        for im in images], axis=1))
            lines.append(json.dumps({"task": task, "id": ex.id, "segments": [
                seg if isinstance(seg, str) else "<image>" for seg in ex.segments]}) + "\n")
        save_image(out / f"{task}.png", np.concatenate(rows, axis=0))
    (out / "samples.jsonl").write_text("".join(lines))
    print(f"wrote {args.per_task} examples per task to {out}/samples.jsonl and "
          f"{', '.join(f'{t}.png' for t in s.tasks)} (one row per example, images in order)")


def eval_sft(args) -> None:
    import jax  # heavy: deferred so cm3leon --help stays fast

    from cm3leon_jax.sft.evaluate import evaluate  # heavy: as above

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    evaluate(cfg, args.workdir, args.out or args.workdir[-1])
