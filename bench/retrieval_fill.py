"""Does the neighbors table fill on class-captioned data? Fashion-MNIST through the real CLI.

    python bench/retrieval_fill.py --workdir runs/fill_fashion [--size 10000]
        [--duplicates 500] [--image-tokenizer DIR] [section.key=value ...]

Every Fashion-MNIST caption is one of ten class names, so each repeats about a thousand
times in 10,000 documents: the case where "skip candidates scoring above 0.9" starved the
table. Fashion-MNIST has no two identical images, so the bench adds some: `--duplicates`
exact copies of documents and as many copies of an image under another class's caption.
Runs `cm3leon prepare` (test split, `--size` documents; the image tokenizer given, else one
trained by prepare), writes the documents plus the copies as a second prepared directory,
then `cm3leon retrieval train-encoder` (on the originals), `cm3leon index` and `cm3leon
neighbors` on it with the default retrieval settings (plus the overrides), and checks the
table against the documents themselves:

    fill               share of documents with data.k distinct neighbors (what training draws)
    k_histogram        distinct neighbors per document
    same_pixels        neighbor pairs whose images are byte-identical (must be 0)
    same_image_tokens  neighbor pairs whose image tokens are identical
    same_class         share of neighbors of the query's class (relevance)
    identical_images_in_data  documents whose pixels equal an earlier document's (the copies)

Stages already done in the workdir are reused (delete it to start over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax import cli  # noqa: E402
from cm3leon_jax.config import load_config  # noqa: E402
from cm3leon_jax.data import records  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def write_copies(docs: list[dict], n: int, out: Path, data: Path) -> None:
    """`docs`, then n exact copies (documents 0..n-1) and n images under another class's
    caption (documents n..2n-1 with the text of the next document of another class)."""
    copies = [{**docs[i], "id": f"copy-{i}"} for i in range(n)]
    for i in range(n, 2 * n):
        j = next(j for j in range(i + 1, len(docs)) if docs[j]["caption"] != docs[i]["caption"])
        copies.append({**docs[i], "id": f"recaptioned-{i}", "caption": docs[j]["caption"],
                       "text": docs[j]["text"]})
    records.write_documents(out, [docs + copies])
    shutil.copy(data / "vocab.json", out / "vocab.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", type=int, default=10000)
    p.add_argument("--duplicates", type=int, default=500)
    p.add_argument("--image-tokenizer", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    work = Path(args.workdir)
    data, copied, ret = work / "data", work / "with_copies", work / "retrieval"
    source = ["--config", str(CONFIG), "source.kind=fashion_mnist", "source.split=test",
              f"source.size={args.size}", f"retrieval.dir={ret}", *args.overrides]
    if args.image_tokenizer:
        source.append(f"prepare.image_tokenizer={args.image_tokenizer}")
    if not (data / "manifest.json").exists():
        assert cli.main(["prepare", *source, f"data.dir={data}"]) == 0
    if not (ret / "encoder" / "encoder.json").exists():
        assert cli.main(["retrieval", "train-encoder", *source, f"data.dir={data}"]) == 0
    docs = list(records.iter_documents(data))
    if not copied.exists():
        write_copies(docs, args.duplicates, copied, data)
    base = [*source, f"data.dir={copied}"]
    assert cli.main(["index", *base]) == 0
    assert cli.main(["neighbors", *base]) == 0
    cfg = load_config(CONFIG, base[2:])
    manifest = json.loads((ret / "manifest.json").read_text())
    table = np.load(ret / "neighbors.npy")
    docs = list(records.iter_documents(copied))
    pixels = [hashlib.sha1(np.asarray(d["pixels"]).tobytes()).hexdigest() for d in docs]
    tokens = [hashlib.sha1(np.asarray(d["image"]).tobytes()).hexdigest() for d in docs]
    pairs = [(i, int(j)) for i, row in enumerate(table) for j in set(row[row >= 0].tolist())]
    counts = np.bincount([i for i, _ in pairs], minlength=len(docs))
    print(json.dumps({
        "documents": len(docs), "data.k": cfg.data.k, "lists": manifest["lists"],
        "pool": manifest["pool"], "fill": manifest["fill"],
        "k_histogram": manifest["k_histogram"], "skipped": manifest["skipped"],
        "neighbor_pairs": len(pairs),
        "same_pixels": sum(pixels[i] == pixels[j] for i, j in pairs),
        "same_image_tokens": sum(tokens[i] == tokens[j] for i, j in pairs),
        "same_class": round(float(np.mean([docs[i]["caption"] == docs[j]["caption"]
                                           for i, j in pairs])), 4),
        "documents_without_neighbors": int((counts == 0).sum()),
        "identical_images_in_data": len(pixels) - len(set(pixels)),
        "neighbors_seconds": manifest["seconds"],
    }))


if __name__ == "__main__":
    main()
