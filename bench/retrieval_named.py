"""Does retrieval help with the long tail? Scores of a named-scenes demo by how often each
held-out scene's name was seen in training.

    cm3leon demo --workdir DIR source.names=1000 source.zipf=0.8 demo.baseline=true
    python bench/retrieval_named.py --demo DIR source.names=1000 source.zipf=0.8 demo.baseline=true

DIR is a finished demo on named scenes (shapes/world.py: captions name a made-up word, what
it shows is only in the training scenes of that name) trained with its no-retrieval
baseline. For the retrieval-trained run and the baseline, each without and with the
retrieved document in front, per group of held-out scenes by the training count of their
name (unseen, 1-3, 4-10, > 10): text->image accuracy (the detector; the demo's CFG and sampling) and image NLL
(nats per token of the true images). Retrieval pays for its tokens where a model cannot
have memorised the name: the rare groups. One JSON line per run and mode.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.demo import job  # noqa: E402
from cm3leon_jax.generate import tasks  # noqa: E402
from cm3leon_jax.layout import DemoDir  # noqa: E402
from cm3leon_jax.retrieval.query import Retriever  # noqa: E402

GROUPS = {"unseen": (0, 0), "1-3": (1, 3), "4-10": (4, 10), ">10": (11, None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="the demo's own overrides")
    args = p.parse_args()
    out = DemoDir(args.demo)
    cfg = job.demo_config(args.config, out.root, args.overrides)
    if not cfg.source.names:
        p.error("the demo's overrides must include source.names (a named-scenes demo)")
    _, model, toks, _ = tasks.load_model(out.run.root)
    source = job.held_out_source(cfg, toks.image.resolution)
    seen = collections.Counter(source.caption(i) for i in range(cfg.source.size))
    scenes = job.held_out(cfg, toks.image.resolution)
    captions = [s.caption for s in scenes]
    count = np.array([seen[c] for c in captions])
    groups = {name: (count >= lo) & (count <= (hi if hi is not None else count.max()))
              for name, (lo, hi) in GROUPS.items()}
    truth = toks.image.encode(np.stack([s.image for s in scenes]))
    n_tokens = toks.image.tokens_per_image
    g = dataclasses.replace(cfg.generate, candidates=1)
    for run_name, run in (("trained with k=1", out.run), ("trained with k=0", out.ablation_run(0))):
        _, model, toks, _ = tasks.load_model(run.root)
        ids = [model.vocab.text_ids(toks.text.encode(c)) for c in captions]
        docs = Retriever(cfg).documents(captions, ids, 1)
        for retrieved in (None, docs):
            codes = tasks.text_to_image(model, ids, n_tokens, g, retrieved=retrieved)
            pixels = toks.image.decode(codes.reshape(-1, n_tokens))
            hits = np.array([job.accuracy([im], [s]) for im, s in zip(pixels, scenes)])
            nll = -np.asarray(tasks.image_logprobs(model, ids, list(truth), retrieved)) / n_tokens
            print(json.dumps({"run": run_name, "retrieved": 0 if retrieved is None else 1,
                              **{name: {"scenes": int(m.sum()),
                                        "accuracy": round(float(hits[m].mean()), 3),
                                        "image_nll": round(float(nll[m].mean()), 3)}
                                 for name, m in groups.items() if m.any()}}), flush=True)


if __name__ == "__main__":
    main()
