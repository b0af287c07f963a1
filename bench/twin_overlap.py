"""How much a retrieved document's image tells about the target's, beyond the caption.

    python bench/twin_overlap.py --data runs/demo/data

On a prepared data set with its neighbors table (`cm3leon neighbors`), per column of the
table (the text-query pool, then the image-query pool): the share of neighbors with the
document's own caption and the share of image-token positions where the neighbor's image
equals the document's. Then, over each document's same-caption twins in the data set, the
same token share for a random twin and for the closest one, and how many documents have a
twin with identical tokens. When the neighbors' share is the random twin's, retrieval adds
nothing the caption does not say (docs/decisions.md, issue 24). One JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cm3leon_jax.data.records import iter_documents  # noqa: E402
from cm3leon_jax.demo.ablate import copied_share  # noqa: E402
from cm3leon_jax.layout import DataDir, RetrievalDir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="a prepared data directory with neighbors")
    args = p.parse_args()
    data = DataDir(args.data)
    neighbors = RetrievalDir(data.retrieval).neighbors
    if not neighbors.exists():
        p.error(f"{neighbors} does not exist: run `cm3leon neighbors` (or `cm3leon demo`) first")
    docs = list(iter_documents(data.root))
    images = np.stack([d["image"] for d in docs])
    captions = [d["caption"] for d in docs]
    table = np.load(neighbors)
    rows = np.arange(len(docs))
    columns = []
    for c in range(table.shape[1]):
        found = table[:, c] >= 0
        q, n = rows[found], table[found, c]
        columns.append({
            "same_caption": round(float(np.mean([captions[i] == captions[j]
                                                 for i, j in zip(q, n)])), 3),
            "token_share": round(float((images[q] == images[n]).mean()), 3)})
    twins = collections.defaultdict(list)
    for i, c in enumerate(captions):
        twins[c].append(i)
    random_share, best_share = [], []
    for i, c in enumerate(captions):
        others = [j for j in twins[c] if j != i]
        if others:
            random_share.append((images[others] == images[i]).mean())
            best_share.append(copied_share(images[i], list(images[others])))
    print(json.dumps({
        "documents": len(docs), "captions": len(twins), "columns": columns,
        "twin_token_share_random": round(float(np.mean(random_share)), 3),
        "twin_token_share_best": round(float(np.mean(best_share)), 3),
        "identical_twin": round(float(np.mean(np.array(best_share) == 1.0)), 3)}))


if __name__ == "__main__":
    main()
