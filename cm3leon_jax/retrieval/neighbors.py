"""Offline neighbor precompute with the CM3Leon retrieval heuristics (paper_spec.md §4.1).

Each training document gets candidate lists from the memory bank, one per query
(`retrieval.query`): `split` (default) searches with the document's text (a fraction of its
tokens dropped) and, separately, with its image, as the paper retrieves "based on image and
text, respectively"; `text`, `image` or `both` (the averaged vector) make one list. A side
the document lacks gives an empty list. For each query, of the top `candidates`:

    1. never the document itself (when the bank is the training set),
    2. skip a duplicate: the same sides, each near-identical (texts scoring above
       `max_text_score`, images above `max_image_score`),
    3. skip the same image (image sides above `max_image_score`) under another caption,
    4. documents with both modalities first (`prefer_pairs`), by score within each group,
    5. skip a candidate that is a duplicate or the same image of one already chosen (in
       this list or an earlier one: the pools' union holds no two copies),
    6. keep `pool`.

A same-caption twin with another image is kept: on class-captioned data (every caption
repeated thousands of times) it is the relevant neighbor, and skipping it starves the table.

Training draws data.k distinct documents from a row at every read (data/pipeline.py), so
the pool is what varies between epochs. Output (`<retrieval dir>`, layout.RetrievalDir):
neighbors.npy int64 [N, lists x pool] (bank indices, the lists side by side, -1 where fewer
were found), scores.npy float32 (query–neighbor score, -inf where none) and manifest.json
with the fill rate (share of documents with at least data.k distinct neighbors) and the
histogram of distinct neighbors per document. Row i is document i of the training set.
Work can be split by document range (`shard` of `num_shards`); shard files merge into the
same table. The retrieval directory may be on cloud storage (storage.py).
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import Config, RetrievalConfig
from cm3leon_jax.data import records
from cm3leon_jax.layout import RetrievalDir, bank_dir, data_dir, retrieval_dir
from cm3leon_jax.retrieval import embed, index
from cm3leon_jax.retrieval.encoders import make_encoder

REASONS = ("self", "near_duplicate", "same_image", "duplicate_of_chosen", "empty")
BLOCK = 4096  # queries searched and filtered at a time (progress, bounded memory)


class Sides(NamedTuple):
    """Unit text and image vectors of documents, [n, D] each; an all-zero row: no such side."""
    text: np.ndarray
    image: np.ndarray

    def take(self, rows) -> "Sides":
        return Sides(np.asarray(self.text[rows]), np.asarray(self.image[rows]))


def _present(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=-1) > 0


def same_image(a: Sides, b: Sides, threshold: float) -> np.ndarray:
    """[len(a), len(b)]: both have an image and the images score above `threshold`."""
    both = _present(a.image)[:, None] & _present(b.image)[None, :]
    return both & (a.image @ b.image.T > threshold)


def duplicate(a: Sides, b: Sides, text_threshold: float,
              image_threshold: float) -> np.ndarray:
    """[len(a), len(b)]: the documents have the same sides and each is near-identical -- the
    same document, not merely the same caption or a similar image."""
    shared = np.zeros((len(a.text), len(b.text)), bool)  # a side both have
    close = np.ones_like(shared)  # no side one lacks, every side near-identical
    for x, y, threshold in ((a.text, b.text, text_threshold),
                            (a.image, b.image, image_threshold)):
        px, py = _present(x), _present(y)
        both = px[:, None] & py[None, :]
        shared |= both
        close &= (px[:, None] == py[None, :]) & (~both | (x @ y.T > threshold))
    return shared & close


def select(self_ids: np.ndarray, cand_ids: np.ndarray, cand_scores: np.ndarray,
           own: Sides, bank: Sides, pairs: np.ndarray, r: RetrievalConfig,
           chosen_before: np.ndarray | None = None) -> tuple:
    """Apply the heuristics row by row: (ids [Q, pool], scores [Q, pool], skip counts).

    self_ids[q] is the bank index of query q's own document (-1: not in the bank), own its
    sides (undropped); cand_* are best-first search results (-1 ids for missing); pairs[m]
    says bank document m has both modalities; chosen_before [Q, *] holds the documents the
    row's earlier lists chose (-1: none): the same one may be chosen again, a duplicate of
    it may not. A bank document with no side is never chosen.
    """
    Q = len(cand_ids)
    out_ids = np.full((Q, r.pool), -1, np.int64)
    out_scores = np.full((Q, r.pool), -np.inf, np.float32)
    skipped = dict.fromkeys(REASONS, 0)
    for q in range(Q):
        ids, scores = cand_ids[q], cand_scores[q]
        found = ids >= 0
        ids, scores = ids[found], scores[found]
        cand = bank.take(ids)
        valid = _present(cand.text) | _present(cand.image)
        skipped["empty"] += int((~valid).sum())
        me = own.take([q])
        is_self = valid & (ids == self_ids[q])
        near = valid & ~is_self & duplicate(me, cand, r.max_text_score, r.max_image_score)[0]
        twin = valid & ~is_self & ~near & same_image(me, cand, r.max_image_score)[0]
        skipped["self"] += int(is_self.sum())
        skipped["near_duplicate"] += int(near.sum())
        skipped["same_image"] += int(twin.sum())
        keep = valid & ~is_self & ~near & ~twin
        ids, scores, cand = ids[keep], scores[keep], cand.take(keep)
        order = np.argsort(-scores, kind="stable")
        if r.prefer_pairs:
            order = order[np.argsort(~pairs[ids[order]], kind="stable")]
        clash = (duplicate(cand, cand, r.max_text_score, r.max_image_score)
                 | same_image(cand, cand, r.max_image_score))
        before = np.zeros(len(ids), bool)
        if chosen_before is not None:
            earlier = np.unique(chosen_before[q][chosen_before[q] >= 0])
            prior = bank.take(earlier)
            before = ((duplicate(prior, cand, r.max_text_score, r.max_image_score)
                       | same_image(prior, cand, r.max_image_score))
                      & (earlier[:, None] != ids[None, :])).any(0)
        chosen: list[int] = []
        for c in order:
            if len(chosen) == r.pool:
                break
            if before[c] or clash[chosen, c].any():
                skipped["duplicate_of_chosen"] += 1
                continue
            chosen.append(int(c))
        out_ids[q, :len(chosen)] = ids[chosen]
        out_scores[q, :len(chosen)] = scores[chosen]
    return out_ids, out_scores, skipped


def distinct_counts(ids: np.ndarray) -> np.ndarray:
    """Distinct neighbors per row (what training draws from)."""
    s = np.sort(ids, axis=1)
    new = np.ones_like(s, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return ((s >= 0) & new).sum(1)


def train_dir(cfg: Config) -> str:
    """The prepared directory whose documents get neighbors (data.dir)."""
    return str(data_dir(cfg).root)


def _same(a: storage.PathLike, b: storage.PathLike) -> bool:
    return storage.absolute(a) == storage.absolute(b)


# --- cm3leon index -------------------------------------------------------------------

def build_bank_index(cfg: Config) -> dict:
    """Embed the memory bank (resumable), save its vectors, build and serialize ScaNN (in
    `retrieval.index_shards` document ranges, index.py)."""
    r, out = cfg.retrieval, retrieval_dir(cfg)
    source_dir = bank_dir(cfg)
    n = len(records.open_documents(source_dir))
    t0 = time.perf_counter()
    if r.encoder == "npy":
        sides = embed.read_npy(source_dir, r, n)
        sides["modalities"] = embed.read_modalities(source_dir)
        fingerprint = "npy"
    else:
        encoder = make_encoder(r, out)
        fingerprint = encoder.fingerprint
        sides = embed.embed_range(source_dir, encoder, 0, n, r, out.bank / "chunks",
                                  desc="embed bank")
    embed_s = time.perf_counter() - t0
    vectors = embed.document_vectors(sides["text"], sides["image"])
    for name, a in (("text", sides["text"]), ("image", sides["image"]),
                    ("modalities", sides["modalities"]), ("vectors", vectors)):
        storage.save_npy(out.bank / f"{name}.npy", a)
    manifest = index.build_index(vectors, out.index, r, extra={
        "bank": str(source_dir), "encoder": r.encoder, "encoder_fingerprint": fingerprint,
        "embed_seconds": round(embed_s, 1),
        "pairs": int(np.sum(sides["modalities"] == embed.TEXT | embed.IMAGE)),
        "unembedded": int(np.sum(np.linalg.norm(vectors, axis=1) == 0))})
    return manifest


# --- cm3leon neighbors ---------------------------------------------------------------

def _queries(cfg: Config, lo: int, hi: int, same_bank: bool,
             cache: storage.Path) -> tuple[dict[str, np.ndarray], Sides]:
    """({list: query vectors [hi - lo, D]}, the documents' own undropped sides)."""
    r, out = cfg.retrieval, retrieval_dir(cfg)
    data_dir = train_dir(cfg)
    if r.encoder == "npy":
        sides = embed.read_npy(data_dir, r, len(records.open_documents(data_dir)))
        own = Sides(sides["text"][lo:hi], sides["image"][lo:hi])
        dropped = own.text
    else:
        encoder = make_encoder(r, out)
        built = json.loads((out.index / index.MANIFEST).read_text())["encoder_fingerprint"]
        if encoder.fingerprint != built:
            raise ValueError(f"{out.index}: built with encoder {built}, the encoder now is "
                             f"{encoder.fingerprint} (retrained?); rerun `cm3leon index`")
        if same_bank:
            own = Sides(storage.load_npy(out.bank / "text.npy", mmap=True)[lo:hi],
                        storage.load_npy(out.bank / "image.npy", mmap=True)[lo:hi])
        else:
            sides = embed.embed_range(data_dir, encoder, lo, hi, r, cache / "own",
                                      desc="embed documents")
            own = Sides(sides["text"], sides["image"])
        dropped = own.text
        if r.query_text_dropout and r.query != "image":
            dropped = embed.embed_range(data_dir, encoder, lo, hi, r, cache / "query",
                                        dropout=r.query_text_dropout, want_image=False,
                                        desc="embed queries")["text"]
    own = Sides(np.asarray(own.text, np.float32), np.asarray(own.image, np.float32))
    zeros = np.zeros_like(own.text)
    made = {"text": lambda: embed.document_vectors(dropped, zeros),
            "image": lambda: embed.document_vectors(zeros, own.image),
            "both": lambda: embed.document_vectors(dropped, own.image)}
    return {name: made[name]() for name in r.lists()}, own


def shard_path(out: RetrievalDir, shard: int, num_shards: int) -> storage.Path:
    return out.shards / f"neighbors-{shard:05d}-of-{num_shards:05d}.npz"


def compute_neighbors(cfg: Config, shard: int = 0, num_shards: int = 1) -> dict:
    """Neighbors of documents in this shard's range; writes the table (one shard) or a
    shard file (several); returns a summary."""
    r, out = cfg.retrieval, retrieval_dir(cfg)
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside [0, {num_shards})")
    if not (out.index / index.MANIFEST).exists():
        raise FileNotFoundError(f"{out.index}: no index (run `cm3leon index` first)")
    index_manifest = json.loads((out.index / index.MANIFEST).read_text())
    if index_manifest["encoder"] != r.encoder:
        raise ValueError(f"{out.index}: built with encoder {index_manifest['encoder']!r}, "
                         f"config has retrieval.encoder={r.encoder!r}; rebuild the index")
    if index.shard_count(index_manifest) != r.index_shards:
        raise ValueError(f"{out.index}: built in {index.shard_count(index_manifest)} shards, "
                         f"config has retrieval.index_shards={r.index_shards}; rerun "
                         "`cm3leon index`")
    if not _same(index_manifest["bank"], bank_dir(cfg)):
        raise ValueError(f"{out.index}: indexes the bank {index_manifest['bank']}, the config's "
                         f"bank is {bank_dir(cfg)} (retrieval.bank); rerun `cm3leon index`")
    data_dir = train_dir(cfg)
    same_bank = _same(data_dir, bank_dir(cfg))
    n = len(records.open_documents(data_dir))
    lo, hi = index.shard_ranges(n, num_shards)[shard]
    t0 = time.perf_counter()
    queries, own = _queries(cfg, lo, hi, same_bank,
                            out.queries / f"shard-{shard:05d}-of-{num_shards:05d}")
    t_embed = time.perf_counter() - t0
    bank = Sides(storage.load_npy(out.bank / "text.npy", mmap=True),
                 storage.load_npy(out.bank / "image.npy", mmap=True))
    pairs = storage.load_npy(out.bank / "modalities.npy") == (embed.TEXT | embed.IMAGE)
    searcher = index.load_searcher(out.index)
    self_ids = np.arange(lo, hi) if same_bank else np.full(hi - lo, -1)
    width = len(queries) * r.pool
    ids = np.full((hi - lo, width), -1, np.int64)
    scores = np.full((hi - lo, width), -np.inf, np.float32)
    skipped = dict.fromkeys(REASONS, 0)
    t_search = 0.0
    with tqdm(total=(hi - lo) * len(queries), desc="neighbors", unit="query") as bar:
        for j, q in enumerate(queries.values()):
            cols = slice(j * r.pool, (j + 1) * r.pool)
            for s in range(0, hi - lo, BLOCK):
                rows = slice(s, min(s + BLOCK, hi - lo))
                t1 = time.perf_counter()
                cand_ids, cand_scores = index.search(searcher, q[rows],
                                                     r.candidates + int(same_bank))
                t_search += time.perf_counter() - t1
                cand_ids[~_present(q[rows])] = -1  # an absent side retrieves nothing
                i, sc, sk = select(self_ids[rows], cand_ids, cand_scores, own.take(rows),
                                   bank, pairs, r, ids[rows, :j * r.pool] if j else None)
                ids[rows, cols], scores[rows, cols] = i, sc
                skipped = {k: skipped[k] + sk[k] for k in REASONS}
                bar.update(len(i))
    seconds = time.perf_counter() - t0
    summary = {"documents": hi - lo, "range": [lo, hi], "lists": list(r.lists()),
               "pool": r.pool, "seconds": round(seconds, 2),
               "embed_seconds": round(t_embed, 2), "search_seconds": round(t_search, 2),
               "skipped": skipped,
               "empty_queries": {name: int((~_present(q)).sum()) for name, q in queries.items()}}
    if num_shards == 1:
        return write_table(cfg, ids, scores, [summary], index_manifest)
    storage.save_npz(shard_path(out, shard, num_shards), ids=ids, scores=scores,
                      summary=json.dumps(summary))
    return summary


def merge_shards(cfg: Config, num_shards: int) -> dict:
    """Join every shard file into the table; fails naming the first missing shard."""
    out = retrieval_dir(cfg)
    n = len(records.open_documents(train_dir(cfg)))
    ids, scores, summaries = [], [], []
    for s in range(num_shards):
        path = shard_path(out, s, num_shards)
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard {s} of {num_shards} has not been computed")
        z = storage.load_npz(path)
        summary = json.loads(str(z["summary"]))
        if summary["range"] != list(index.shard_ranges(n, num_shards)[s]):
            raise ValueError(f"{path}: covers documents {summary['range']}, expected "
                             f"{list(index.shard_ranges(n, num_shards)[s])} of {n}")
        made = (summary.get("lists"), summary.get("pool"))
        if made != (list(cfg.retrieval.lists()), cfg.retrieval.pool):
            raise ValueError(f"{path}: computed with lists {made[0]} of {made[1]}, the "
                             f"config makes {list(cfg.retrieval.lists())} of "
                             f"{cfg.retrieval.pool} (retrieval.query, retrieval.pool); "
                             "recompute that shard")
        ids.append(z["ids"]), scores.append(z["scores"]), summaries.append(summary)
    index_manifest = json.loads((out.index / index.MANIFEST).read_text())
    return write_table(cfg, np.concatenate(ids), np.concatenate(scores), summaries,
                       index_manifest)


def write_table(cfg: Config, ids: np.ndarray, scores: np.ndarray, summaries: list[dict],
                index_manifest: dict) -> dict:
    out, r, k = retrieval_dir(cfg), cfg.retrieval, cfg.data.k
    for path, a in ((out.neighbors, ids.astype(np.int64)), (out.scores, scores.astype(np.float32))):
        storage.save_npy(path, a)
    counts = distinct_counts(ids)
    found = ids >= 0
    seconds = sum(s["seconds"] for s in summaries)
    manifest = {
        "documents": int(len(ids)), "lists": list(r.lists()), "pool": r.pool, "k": k,
        "data_dir": train_dir(cfg), "bank": str(bank_dir(cfg)),
        "same_bank": _same(train_dir(cfg), bank_dir(cfg)),
        "fill": round(float(np.mean(counts >= k)), 4) if len(ids) else 0.0,
        "k_histogram": {int(c): int(n) for c, n in zip(*np.unique(counts, return_counts=True))},
        "mean_score": round(float(scores[found].mean()), 4) if found.any() else None,
        "skipped": {key: sum(s["skipped"][key] for s in summaries) for key in REASONS},
        "empty_queries": {name: sum(s["empty_queries"][name] for s in summaries)
                          for name in r.lists()},
        "shards": len(summaries), "seconds": round(seconds, 2),
        "documents_per_second": round(len(ids) / max(seconds, 1e-9), 1),
        "index": index_manifest, "retrieval": cfg.to_dict()["retrieval"],
    }
    out.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def table_is_current(cfg: Config) -> bool:
    """Whether the neighbors table exists and was made with this retrieval section (a
    table from other settings, or from before the pools, is not reused)."""
    out = retrieval_dir(cfg)
    if not (out.neighbors.exists() and out.manifest.exists()):
        return False
    return json.loads(out.manifest.read_text()).get("retrieval") == cfg.to_dict()["retrieval"]


def fill_warning(manifest: dict, min_fill: float) -> str | None:
    """A loud message when too few documents have data.k neighbors, else None."""
    if manifest["fill"] >= min_fill:
        return None
    short = manifest["documents"] - round(manifest["fill"] * manifest["documents"])
    return (f"WARNING: only {manifest['fill']:.1%} of documents have data.k={manifest['k']} "
            f"distinct neighbors (retrieval.min_fill={min_fill}); {short:,} documents will "
            "train with fewer retrieved documents. Skipped candidates: "
            f"{manifest['skipped']}. Search more (retrieval.candidates), loosen "
            "retrieval.max_text_score / max_image_score, or check the encoder "
            "(docs/retrieval.md).")
