"""Retrieval quality of the built-in dual encoder on `shapes`, through the real CLI.

    python bench/retrieval_shapes.py [--train 4000] [--heldout 500] [--resolution 64]
                                     [--max-objects 1] [--workdir DIR] [retrieval.key=value ...]

Writes two prepared directories from the shapes source (different seeds: the held-out
scenes are not in the bank) — captions through a sentencepiece model trained on the bank's
captions, pixels at `--resolution`; no image tokens, which the encoder does not read — then
runs `cm3leon retrieval train-encoder` and `cm3leon index` on the bank and `cm3leon
neighbors` for the held-out documents against it. A held-out query is a hit when its first
neighbor's scene has the same (colour, shape) objects as the query's (the JSON ground truth
in meta). Reported for the default heuristics (split lists: the text list's and the image
list's first) and for plain top-1 (max_score=max_image_score=1), with queries from
text+image, text only and image only, and without query dropout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax import cli  # noqa: E402
from cm3leon_jax.data import records  # noqa: E402
from cm3leon_jax.data.sources import ShapesSource  # noqa: E402
from cm3leon_jax.tokenizers.text import train_text_tokenizer  # noqa: E402
from cm3leon_jax.vocab import Vocab  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def write_shapes(path: Path, source: ShapesSource, tokenizer, vocab: Vocab) -> list[set]:
    """A prepared directory of the source's scenes; returns each scene's (colour, shape)s."""
    docs, truth = [], []
    for i in range(len(source)):
        pair = source[i]
        docs.append({"id": pair.id, "caption": pair.caption,
                     "text": vocab.text_ids(tokenizer.encode(pair.caption)),
                     "image": np.zeros(0, np.int32), "pixels": pair.image,
                     "meta": json.dumps(pair.meta)})
        truth.append(frozenset((o["colour"], o["shape"]) for o in pair.meta["objects"]))
    records.write_documents(path, [docs])
    vocab.save(path / "vocab.json")
    return truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--max-objects", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrieval_shapes_"))
    bank_src = ShapesSource(args.train, args.resolution, seed=0, max_objects=args.max_objects)
    query_src = ShapesSource(args.heldout, args.resolution, seed=1, max_objects=args.max_objects)
    tokenizer = train_text_tokenizer([bank_src.caption(i) for i in range(len(bank_src))], 512)
    vocab = Vocab(512, 16, 16)
    bank, queries = work / "bank", work / "heldout"
    bank_truth = write_shapes(bank, bank_src, tokenizer, vocab)
    query_truth = write_shapes(queries, query_src, tokenizer, vocab)
    ret = work / "retrieval"
    base = ["--config", str(CONFIG), f"retrieval.dir={ret}", *args.overrides]
    assert cli.main(["retrieval", "train-encoder", *base, f"data.dir={bank}"]) == 0
    assert cli.main(["index", *base, f"data.dir={bank}"]) == 0
    results = {}
    top1 = ["retrieval.max_score=1.0", "retrieval.max_image_score=1.0"]
    runs = {"split/heuristics": ["retrieval.query=split"],
            "both/heuristics": ["retrieval.query=both"],
            "both/top1": ["retrieval.query=both", *top1],
            "text/top1": ["retrieval.query=text", *top1],
            "image/top1": ["retrieval.query=image", *top1],
            "both/top1/no_dropout": ["retrieval.query=both", "retrieval.query_text_dropout=0",
                                     *top1]}
    for name, extra in runs.items():
        assert cli.main(["neighbors", *base, f"data.dir={queries}", f"retrieval.bank={bank}",
                         *extra]) == 0
        table = np.load(ret / "neighbors.npy")
        pool = json.loads((ret / "manifest.json").read_text())["pool"]
        lists = ("text", "image") if name.startswith("split") else (name.split("/")[0],)
        for j, query in enumerate(lists):
            first = table[:, j * pool]
            hits = [f >= 0 and bank_truth[f] == t for f, t in zip(first, query_truth)]
            results[name + (f"/{query}" if len(lists) > 1 else "")] = round(float(np.mean(hits)), 4)
    info = json.loads((ret / "encoder" / "encoder.json").read_text())
    print(json.dumps({"bank": args.train, "heldout": args.heldout,
                      "resolution": args.resolution, "max_objects": args.max_objects,
                      "encoder_steps": info["steps"], "encoder_seconds": info["seconds"],
                      "loss": [info["loss_first"], info["loss_last"]],
                      "same_colour_and_shape": results, "workdir": str(work)}))


if __name__ == "__main__":
    main()
