"""The `cm3leon` command: one subcommand per stage of the flow.

    cm3leon train  --config FILE --workdir DIR [section.key=value ...]
    cm3leon params --config FILE [--json] [--devices N] [section.key=value ...]
    cm3leon compile --config FILE --topology NAME [--step train|generate] [--json] [section.key=value ...]
    cm3leon retrieval train-encoder --config FILE [section.key=value ...]
    cm3leon index  --config FILE [section.key=value ...]
    cm3leon neighbors --config FILE [--shard I --num-shards N | --merge N] [section.key=value ...]
    cm3leon prepare --config FILE [section.key=value ...]
    cm3leon tokenizer train-image --config FILE --workdir DIR [section.key=value ...]
    cm3leon sft-data --config FILE --out DIR [--per-task N] [section.key=value ...]
    cm3leon sft    --config FILE --init RUN_OR_EXPORT --workdir DIR [section.key=value ...]
    cm3leon eval-sft --config FILE --workdir RUN [--workdir RUN ...] [--out DIR] [section.key=value ...]
    cm3leon sweep  --config FILE --runs DIR [section.key=value ...]
    cm3leon fit-scaling RUNS_DIR [--out DIR]
    cm3leon export --workdir RUN [--step N] --format safetensors|hf-opt --out DIR
    cm3leon score  (--workdir RUN [--step N] | --export DIR) --tokens IN.npy --out OUT.npy
    cm3leon generate image   --workdir RUN --prompt TEXT [--num N --cfg S --out FILE.png] [key=value ...]
    cm3leon generate caption --workdir RUN --image FILE [...] [key=value ...]
    cm3leon generate infill  --workdir RUN --before TEXT --after TEXT [key=value ...]
    cm3leon demo --workdir DIR [--config configs/demo.yaml] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cm3leon_jax.config import ConfigError, load_config


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50 mesh.fsdp=2")
    return p


def _run_training(command: str, config: str, overrides: list[str], workdir: str) -> None:
    """Start the multi-process runtime, load the config, train; bad steps exit 3."""
    import jax

    from cm3leon_jax.parallel import distributed
    from cm3leon_jax.train.loop import BadStepsError, train

    distributed.initialize()  # before anything touches the devices
    cfg = load_config(config, overrides, num_devices=jax.device_count())
    try:
        train(cfg, workdir)
    except BadStepsError as e:
        print(f"cm3leon {command}: {e}", file=sys.stderr)
        sys.exit(3)


def cmd_train(args) -> None:
    _run_training("train", args.config, args.overrides, args.workdir)


def cmd_params(args) -> None:
    from cm3leon_jax.model.size import flops_per_token, param_counts
    from cm3leon_jax.train.state import abstract_state, state_bytes_per_device, tree_bytes

    cfg = load_config(args.config, args.overrides, num_devices=args.devices)
    vocab = cfg.vocab.build()
    counts = param_counts(cfg.model, vocab.size)
    state = abstract_state(cfg)
    report = {
        "params": counts["total"],
        "flops_per_token": flops_per_token(cfg.model, vocab.size, cfg.data.seq_len),
        "state_bytes": tree_bytes(state),
    }
    if args.devices:
        report["state_bytes_per_device"] = state_bytes_per_device(cfg, args.devices)
    if args.json:
        print(json.dumps(report))
        return
    print(f"config            {args.config}")
    print(f"parameters        {counts['total']:,} ({counts['total'] / 1e6:.1f}M)")
    for part in ("embedding", "positions", "layers", "lm_head"):
        print(f"  {part:<15} {counts[part]:,}")
    print(f"vocabulary        {vocab.size:,} rows ({vocab.used_size:,} used)")
    print(f"FLOPs per token   {report['flops_per_token']:.4g} "
          f"(training: 6 x matmul params + causal attention at seq {cfg.data.seq_len})")
    print(f"state bytes       {report['state_bytes']:,} "
          f"({report['state_bytes'] / 2**30:.2f} GiB: float32 params + AdamW mu, nu)")
    if args.devices:
        print(f"  per device      {report['state_bytes_per_device']:,} "
              f"(sharded over {args.devices} devices by the config's mesh)")


def cmd_compile(args) -> None:
    import importlib.util

    from cm3leon_jax.parallel.topology import parse_topology
    from cm3leon_jax.train.aot import DoesNotFit, advice, compile_train_step, format_report

    topology = parse_topology(args.topology)
    cfg = load_config(args.config, args.overrides, num_devices=topology.num_chips)
    shape_of = None
    if args.step == "generate":
        from cm3leon_jax.generate.aot import generate_shape

        shape_of = lambda chips: generate_shape(
            cfg, chips, args.batch, args.image_tokens, args.prompt_tokens, args.cfg)
        shape_of(1)  # bad sizes fail here, before libtpu or the compiler start
    if importlib.util.find_spec("libtpu") is None:
        print("cm3leon compile: needs libtpu, the TPU compiler: pip install -e '.[tpu]' "
              "(it works on machines without a TPU)", file=sys.stderr)
        raise SystemExit(2)
    if shape_of is not None:
        return _compile_generate(args, cfg, topology, shape_of)
    try:
        report = compile_train_step(cfg, topology)
    except DoesNotFit as e:
        print(f"cm3leon compile: {args.config} {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(report.to_dict()) if args.json else format_report(report, args.config))
    if not report.fits:
        print(f"cm3leon compile: {args.config} {advice(cfg, topology, report)}",
              file=sys.stderr)
        raise SystemExit(1)


def _compile_generate(args, cfg, topology, shape_of) -> None:
    from cm3leon_jax.generate import aot
    from cm3leon_jax.train.aot import DoesNotFit

    try:
        report = aot.compile_generate_step(cfg, topology, shape_of)
    except DoesNotFit as e:
        print(f"cm3leon compile: {args.config} {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(report.to_dict()) if args.json else aot.format_report(report, args.config))
    if not report.fits:
        print(f"cm3leon compile: {args.config} {aot.fit_advice(cfg, topology, report)}",
              file=sys.stderr)
        raise SystemExit(1)


def cmd_train_encoder(args) -> None:
    from cm3leon_jax.retrieval.neighbors import train_dir, retrieval_dir
    from cm3leon_jax.retrieval.train_encoder import train_encoder, validate_for_training

    cfg = load_config(args.config, args.overrides)
    validate_for_training(cfg.retrieval)
    out = retrieval_dir(cfg) / "encoder"
    info = train_encoder(cfg, train_dir(cfg), out)
    print(f"encoder: {info['steps']} steps in {info['seconds']} s, loss {info['loss_first']} -> "
          f"{info['loss_last']}, in-batch accuracy {info['batch_accuracy_last']}; saved to {out}")


def cmd_index(args) -> None:
    from cm3leon_jax.retrieval.neighbors import INDEX, build_bank_index, retrieval_dir

    cfg = load_config(args.config, args.overrides)
    m = build_bank_index(cfg)
    print(f"index: {m['kind']} over {m['size']:,} documents x {m['dim']} "
          f"({m['pairs']:,} pairs, {m['unembedded']} unembedded), embedded in "
          f"{m['embed_seconds']} s, built in {m['build_seconds']} s, recall@10 "
          f"{m['recall_at_10']} on {m['recall_queries']} queries; saved to "
          f"{retrieval_dir(cfg) / INDEX}")


def cmd_neighbors(args) -> None:
    from cm3leon_jax.retrieval.neighbors import compute_neighbors, merge_shards, retrieval_dir

    cfg = load_config(args.config, args.overrides)
    if args.merge:
        m = merge_shards(cfg, args.merge)
    else:
        m = compute_neighbors(cfg, args.shard, args.num_shards)
        if args.num_shards > 1:
            print(f"neighbors shard {args.shard}/{args.num_shards}: documents {m['range']} "
                  f"in {m['seconds']} s, skipped {m['skipped']}")
            return
    print(f"neighbors: {m['documents']:,} documents x k={m['k']}, {m['rows_with_k']:,} with k "
          f"found ({m['filled_fraction']:.1%} filled), mean score {m['mean_score']}, skipped "
          f"{m['skipped']}, {m['documents_per_second']:,} documents/s; saved to "
          f"{retrieval_dir(cfg)}")
def cmd_generate(args) -> None:
    from cm3leon_jax.generate import command

    overrides = list(args.overrides)
    if getattr(args, "cfg", None) is not None:
        overrides.append(f"generate.cfg_scale={args.cfg}")
    if args.task == "image":
        command.generate_image(args.workdir, args.prompt, args.num, args.out, overrides)
    elif args.task == "caption":
        command.caption_images(args.workdir, args.image, overrides)
    else:
        command.infill_text(args.workdir, args.before, args.after, overrides)


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample images, captions or infills from a run")
    tasks = gen.add_subparsers(dest="task", required=True)
    helps = {"image": "text -> PNG grid of images", "caption": "image files -> captions",
             "infill": "fill the gap between two texts"}
    for task, text in helps.items():
        p = tasks.add_parser(task, help=text)
        p.add_argument("--workdir", required=True, help="run directory (config.yaml + checkpoints)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="e.g. generate.temperature=0.7 generate.pool=mixed data.dir=DIR")
        p.set_defaults(fn=cmd_generate)
        if task == "image":
            p.add_argument("--prompt", required=True, action="append", help="caption (repeatable)")
            p.add_argument("--num", type=int, default=4, help="images per prompt")
            p.add_argument("--cfg", type=float, help="guidance scale (generate.cfg_scale)")
            p.add_argument("--out", help="PNG path (default RUN/samples/generate-STEP.png)")
        elif task == "caption":
            p.add_argument("--image", required=True, action="append", help="image file (repeatable)")
        else:
            p.add_argument("--before", required=True, help="text before the gap")
            p.add_argument("--after", default="", help="text after the gap")


def cmd_prepare(args) -> None:
    import logging

    from cm3leon_jax.data.prepare import PrepareError, prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    try:
        m = prepare(cfg)
    except PrepareError as e:
        raise SystemExit(f"cm3leon prepare: {e}") from None
    skipped = ", ".join(f"{k} {v}" for k, v in m["skipped"].items()) or "none"
    print(f"prepared {cfg.data.dir}: {m['documents']:,} documents from {m['records']:,} "
          f"records in {len(m['shards'])} shards (skipped: {skipped})")
    print(f"vocabulary {m['vocab']['size']:,} ids ({m['text_pieces']} text pieces, "
          f"{m['vocab']['image_size']} image codes); {m['tokens_per_image']} tokens per "
          f"{m['resolution']}x{m['resolution']} image")
    rates = "  ".join(f"{k} {m['records'] / v:,.0f}/s" for k, v in m["seconds"].items()
                      if k in ("read", "resize", "text", "image", "write") and v > 0)
    print(f"pairs per second by stage: {rates}  (wall {m['wall_seconds']:.1f}s)")


def cmd_tokenizer_train_image(args) -> None:
    from cm3leon_jax.train.vqgan import train_from_config

    cfg = load_config(args.config, args.overrides)
    _, s = train_from_config(cfg, args.workdir)
    v = cfg.vqgan
    print(f"image tokenizer: {v.resolution}x{v.resolution} -> {v.tokens_per_image} tokens from "
          f"{v.codebook_size} codes; {s['steps']} steps on {s['train_images']} shapes images "
          f"in {s['train_seconds']:.0f}s")
    print(f"held-out PSNR {s['psnr']:.2f} dB on {s['eval_images']} images, codebook usage "
          f"{s['codebook_usage']:.1%}, {s['codes_restarted']} dead codes restarted")
    print(f"saved {args.workdir}/image_tokenizer, reconstructions.png, metrics.jsonl")


def cmd_sft_data(args) -> None:
    """The SFT mixture's per-task shares, and sample examples as PNG + JSONL for a look."""

    import numpy as np
    from PIL import Image

    from cm3leon_jax.data.sft_mixture import config_shares, mixture_report
    from cm3leon_jax.data.sft_shapes import ShapesSFT
    from cm3leon_jax.data.sft_tasks import SFTDataError, jsonl_example, read_sft_jsonl

    cfg = load_config(args.config, args.overrides)
    s = cfg.sft
    try:
        shares = config_shares(s)
    except (SFTDataError, ValueError) as e:
        raise SystemExit(f"cm3leon sft-data: {e}") from None
    print(mixture_report(shares, s.seed, args.draws))
    out = Path(args.out)
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
    with open(out / "samples.jsonl", "w") as f:
        for task, exs in examples.items():
            rows = []
            for ex in exs:
                images = [seg for seg in ex.segments if not isinstance(seg, str)]
                rows.append(np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)))
                                            for im in images], axis=1))
                f.write(json.dumps({"task": task, "id": ex.id, "segments": [
                    seg if isinstance(seg, str) else "<image>" for seg in ex.segments]}) + "\n")
            Image.fromarray(np.concatenate(rows, axis=0)).save(out / f"{task}.png")
    print(f"wrote {args.per_task} examples per task to {out}/samples.jsonl and "
          f"{', '.join(f'{t}.png' for t in s.tasks)} (one row per example, images in order)")
def cmd_sft(args) -> None:
    """`cm3leon train` on the SFT mixture from --init's weights (sft.enabled, train.init_from)."""
    _run_training("sft", args.config,
                  [*args.overrides, "sft.enabled=true", f"train.init_from={args.init}"],
                  args.workdir)


def cmd_eval_sft(args) -> None:
    import jax

    from cm3leon_jax.eval.sft import evaluate

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    evaluate(cfg, args.workdir, args.out or args.workdir[-1])


def cmd_export(args) -> None:
    from cm3leon_jax.export.write import export

    export(args.workdir, args.out, args.format, step=args.step,
           with_tokenizers=not args.skip_tokenizers)


def cmd_score(args) -> None:
    from cm3leon_jax.eval.score import check_tokens, load_tokens, save_scores, score_tokens
    from cm3leon_jax.export import source
    from cm3leon_jax.export.safetensors import read_config

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if args.export is not None and args.step is not None:
        raise ConfigError("--step applies to --workdir runs only")
    tokens = load_tokens(args.tokens)  # every check before any weight is read
    cfg = (source.run_config(args.workdir, args.step)[0] if args.workdir
           else read_config(args.export)[0])
    check_tokens(tokens, cfg, args.tokens)
    weights = (source.from_run(args.workdir, args.step, dtype=args.dtype) if args.workdir
               else source.from_export(args.export, dtype=args.dtype))
    s = save_scores(score_tokens(weights, tokens, args.batch_size), args.out)
    print(f"scored {s['rows']} rows ({s['tokens']} tokens) with {weights.origin}: "
          f"mean log-prob {s['mean_logprob']:.4f}, perplexity {s['perplexity']:.3f} "
          f"-> {s['out']}")


def cmd_sweep(args) -> None:
    import jax

    from cm3leon_jax.scaling.sweep import sweep

    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    if not cfg.sweep.sizes:
        raise ConfigError(f"{args.config} has no sweep.sizes: not a sweep config "
                          "(see configs/scaling/)")
    if jax.config.jax_compilation_cache_dir is None:
        # every evaluation step restarts `train`: the cache turns recompiles into reads
        jax.config.update("jax_compilation_cache_dir", str(Path(args.runs) / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    try:
        sweep(cfg, args.runs)
    except FileNotFoundError as e:  # a data directory named by the config is missing
        raise SystemExit(f"cm3leon sweep: {e}") from None


def cmd_fit_scaling(args) -> None:
    from cm3leon_jax.scaling.fit import fit_scaling

    try:
        fit_scaling(args.runs_dir, args.out)
    except FileNotFoundError as e:
        raise SystemExit(f"cm3leon fit-scaling: {e}") from None


def cmd_demo(args) -> None:
    from cm3leon_jax.demo import demo

    demo(args.config, args.workdir, args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3leon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _with_config(sub.add_parser("train", help="train (resumes from DIR's checkpoints)"))
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics")
    p.set_defaults(fn=cmd_train)

    p = _with_config(sub.add_parser("params", help="parameter count, FLOPs, state bytes"))
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--devices", type=int, default=None,
                   help="also the train state bytes per device on a mesh of N devices")
    p.set_defaults(fn=cmd_params)

    p = _with_config(sub.add_parser(
        "compile", help="compile the train step for a TPU pod (no TPU needed): fit, cost"))
    p.add_argument("--topology", required=True,
                   help="TPU slice: v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips); "
                        "SxNAME for S slices, e.g. 2xv5p-128")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--step", choices=("train", "generate"), default="train",
                   help="the train step, or image generation (prefill + KV-cache decoding)")
    p.add_argument("--batch", type=int, default=None,
                   help="generate: images per step (default generate.candidates)")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="generate: tokens per image (default generate.image_tokens, else "
                        "the vqgan section's)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="generate: prompt length (default: the rest of model.max_seq_len)")
    p.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="generate: with the classifier-free-guidance stream (default: as "
                        "the generate section would)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("retrieval", help="retrieval encoder tasks")
    rsub = p.add_subparsers(dest="action", required=True)
    p = _with_config(rsub.add_parser("train-encoder", help="train the built-in dual encoder"))
    p.set_defaults(fn=cmd_train_encoder)

    p = _with_config(sub.add_parser("index", help="embed the memory bank, build ScaNN"))
    p.set_defaults(fn=cmd_index)

    p = _with_config(sub.add_parser("neighbors", help="offline top-k neighbors table"))
    p.add_argument("--shard", type=int, default=0, help="this process's document range")
    p.add_argument("--num-shards", type=int, default=1, help="document ranges in all")
    p.add_argument("--merge", type=int, default=0, metavar="N",
                   help="join the N shard files into the table")
    p.set_defaults(fn=cmd_neighbors)

    p = _with_config(sub.add_parser("prepare", help="tokenize a source into data.dir"))
    p.set_defaults(fn=cmd_prepare)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(
        dest="tokenizer_command", required=True)
    p = _with_config(tok.add_parser("train-image", help="train the VQ-GAN image tokenizer "
                                    "on shapes images"))
    p.add_argument("--workdir", required=True, help="output: image_tokenizer/, PNG, metrics")
    p.set_defaults(fn=cmd_tokenizer_train_image)

    p = _with_config(sub.add_parser("sft-data", help="SFT mixture shares and sample examples"))
    p.add_argument("--out", required=True, help="output: samples.jsonl, one PNG per task")
    p.add_argument("--per-task", type=int, default=4, help="sample examples per task")
    p.add_argument("--draws", type=int, default=10000, help="mixture draws for the drawn share")
    p.set_defaults(fn=cmd_sft_data)

    p = _with_config(sub.add_parser("sft", help="fine-tune on the SFT mixture from a run or "
                                    "export (resumes from DIR)"))
    p.add_argument("--init", required=True, help="run directory (latest checkpoint's "
                   "parameters) or safetensors export to start from")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics")
    p.set_defaults(fn=cmd_sft)

    p = _with_config(sub.add_parser("eval-sft", help="score runs on held-out SFT tasks "
                                    "(caption, VQA, edit, grounding, control)"))
    p.add_argument("--workdir", required=True, action="append", help="a run directory; repeat "
                   "to compare runs (e.g. the pretrained run, then the fine-tuned one)")
    p.add_argument("--out", help="where eval_sft.{json,md,png} go (default: the last run)")
    p.set_defaults(fn=cmd_eval_sft)

    p = _with_config(sub.add_parser("sweep", help="scaling sweep: train and evaluate a "
                                    "family of sizes (resumes from DIR)"))
    p.add_argument("--runs", required=True, help="runs directory: one work dir per size")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("fit-scaling", help="fit L(C) and L(N) to a sweep; print and plot")
    p.add_argument("runs_dir", help="the runs directory of `cm3leon sweep`")
    p.add_argument("--out", help="where fit.json and the PNG plots go (default: RUNS_DIR)")
    p.set_defaults(fn=cmd_fit_scaling)

    p = sub.add_parser("export", help="a checkpoint -> safetensors or HF OPT directory")
    p.add_argument("--workdir", required=True, help="run directory (its checkpoints/)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--format", required=True, choices=["safetensors", "hf-opt"])
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--skip-tokenizers", action="store_true",
                   help="weights only: do not copy the tokenizers of the run's data.dir")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("score", help="per-token log-probabilities of token sequences")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory (its checkpoints/)")
    src.add_argument("--export", help="directory written by `export --format safetensors`")
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
    p.add_argument("--tokens", required=True, help="[B, T] integer token ids (.npy)")
    p.add_argument("--out", required=True, help="[B, T-1] float32 log-probabilities (.npy)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows per step over all devices (rounded up to the data-parallel size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: the run's model.dtype)")
    p.set_defaults(fn=cmd_score)

    _generate_parser(sub)

    p = sub.add_parser("demo", help="the main job on shapes: prepare, retrieval, train, "
                       "generate, report (reuses finished stages)")
    p.add_argument("--workdir", required=True, help="everything goes here; report.md, report.json")
    p.add_argument("--config", default="configs/demo.yaml", help="every stage's settings")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.steps=50")
    p.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"cm3leon {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
