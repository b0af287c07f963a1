"""Offline neighbor precompute with the CM3Leon retrieval heuristics (paper_spec.md §4.1).

For each training document: build its query (text with a fraction of its tokens dropped,
and/or its image, `retrieval.query`), take the top `candidates` from the memory bank, then

    1. never the document itself (when the bank is the training set),
    2. skip candidates scoring above `max_score` against the query (near duplicates),
    3. documents with both modalities first (`prefer_pairs`), by score within each group,
    4. skip a candidate scoring above `max_pair_score` against one already chosen,
    5. keep k.

Output (`<retrieval dir>`, layout.RetrievalDir): neighbors.npy int64 [N, k] (bank indices, -1 where fewer
were found), scores.npy float32 [N, k] (query–neighbor score, -inf where none), and
manifest.json. Row i is document i of the training set (records order). Work can be split
by document range (`shard` of `num_shards`); shard files merge into the same table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cm3leon_jax.config import Config, RetrievalConfig
from cm3leon_jax.data import records
from cm3leon_jax.layout import RetrievalDir, data_dir, retrieval_dir
from cm3leon_jax.retrieval import embed, index
from cm3leon_jax.retrieval.encoders import make_encoder

REASONS = ("self", "near_duplicate", "duplicate_of_chosen", "empty")
BLOCK = 4096  # queries searched and filtered at a time (progress, bounded memory)


def select(self_ids: np.ndarray, cand_ids: np.ndarray, cand_scores: np.ndarray,
           bank: np.ndarray, pairs: np.ndarray, r: RetrievalConfig) -> tuple:
    """Apply the heuristics row by row: (ids [Q, k], scores [Q, k], skip counts).

    self_ids[q] is the bank index of query q's own document (-1: not in the bank);
    cand_* are best-first search results (-1 ids for missing); bank holds unit vectors
    (all-zero rows are never chosen); pairs[m] says bank document m has both modalities.
    """
    Q = len(cand_ids)
    out_ids = np.full((Q, r.k), -1, np.int64)
    out_scores = np.full((Q, r.k), -np.inf, np.float32)
    skipped = dict.fromkeys(REASONS, 0)
    valid = np.linalg.norm(bank, axis=1) > 0
    for q in range(Q):
        ids, scores = cand_ids[q], cand_scores[q]
        keep = ids >= 0
        keep &= valid[np.where(keep, ids, 0)]
        skipped["empty"] += int(np.sum(ids >= 0) - keep.sum())
        is_self = keep & (ids == self_ids[q])
        skipped["self"] += int(is_self.sum())
        near = keep & ~is_self & (scores > r.max_score)
        skipped["near_duplicate"] += int(near.sum())
        keep &= ~is_self & ~near
        ids, scores = ids[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")
        if r.prefer_pairs:
            order = order[np.argsort(~pairs[ids[order]], kind="stable")]
        chosen = []
        for c in order:
            if chosen and np.max(bank[ids[chosen]] @ bank[ids[c]]) > r.max_pair_score:
                skipped["duplicate_of_chosen"] += 1
                continue
            chosen.append(c)
            if len(chosen) == r.k:
                break
        out_ids[q, :len(chosen)] = ids[chosen]
        out_scores[q, :len(chosen)] = scores[chosen]
    return out_ids, out_scores, skipped


def train_dir(cfg: Config) -> str:
    """The prepared directory whose documents get neighbors (data.dir)."""
    return str(data_dir(cfg).root)


def bank_dir(cfg: Config) -> str:
    return cfg.retrieval.bank or train_dir(cfg)


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --- cm3leon index -------------------------------------------------------------------

def build_bank_index(cfg: Config) -> dict:
    """Embed the memory bank (resumable), save its vectors, build and serialize ScaNN."""
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
    out.bank.mkdir(parents=True, exist_ok=True)
    for name, a in (("text", sides["text"]), ("image", sides["image"]),
                    ("modalities", sides["modalities"]), ("vectors", vectors)):
        np.save(out.bank / f"{name}.npy", a)
    manifest = index.build_index(vectors, out.index, r, extra={
        "bank": str(source_dir), "encoder": r.encoder, "encoder_fingerprint": fingerprint,
        "embed_seconds": round(embed_s, 1),
        "pairs": int(np.sum(sides["modalities"] == embed.TEXT | embed.IMAGE)),
        "unembedded": int(np.sum(np.linalg.norm(vectors, axis=1) == 0))})
    return manifest


# --- cm3leon neighbors ---------------------------------------------------------------

def _query_vectors(cfg: Config, lo: int, hi: int, same_bank: bool, cache: Path) -> np.ndarray:
    r, out = cfg.retrieval, retrieval_dir(cfg)
    data_dir = train_dir(cfg)
    want_text, want_image = r.query in ("text", "both"), r.query in ("image", "both")
    if r.encoder == "npy":
        n = len(records.open_documents(data_dir))
        sides = embed.read_npy(data_dir, r, n)
        text, image = sides["text"][lo:hi], sides["image"][lo:hi]
    else:
        encoder = make_encoder(r, out)
        built = json.loads((out.index / index.MANIFEST).read_text())["encoder_fingerprint"]
        if encoder.fingerprint != built:
            raise ValueError(f"{out.index}: built with encoder {built}, the encoder now is "
                             f"{encoder.fingerprint} (retrained?); rerun `cm3leon index`")
        reuse_image = same_bank and want_image
        sides = embed.embed_range(data_dir, encoder, lo, hi, r, cache,
                                  dropout=r.query_text_dropout, want_text=want_text,
                                  want_image=want_image and not reuse_image, desc="embed queries")
        text, image = sides["text"], sides["image"]
        if reuse_image:
            image = np.load(out.bank / "image.npy", mmap_mode="r")[lo:hi]
    zeros = np.zeros_like(text)
    return embed.document_vectors(text if want_text else zeros, image if want_image else zeros)


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    return n * shard // num_shards, n * (shard + 1) // num_shards


def shard_path(out: RetrievalDir, shard: int, num_shards: int) -> Path:
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
    if not _same(index_manifest["bank"], bank_dir(cfg)):
        raise ValueError(f"{out.index}: indexes the bank {index_manifest['bank']}, the config's "
                         f"bank is {bank_dir(cfg)} (retrieval.bank); rerun `cm3leon index`")
    data_dir = train_dir(cfg)
    same_bank = _same(data_dir, bank_dir(cfg))
    n = len(records.open_documents(data_dir))
    lo, hi = shard_range(n, shard, num_shards)
    t0 = time.perf_counter()
    queries = _query_vectors(cfg, lo, hi, same_bank,
                             out.queries / f"shard-{shard:05d}-of-{num_shards:05d}")
    t_embed = time.perf_counter() - t0
    bank = np.load(out.bank / "vectors.npy")
    pairs = np.load(out.bank / "modalities.npy") == (embed.TEXT | embed.IMAGE)
    searcher = index.load_searcher(out.index)
    self_ids = np.arange(lo, hi) if same_bank else np.full(hi - lo, -1)
    ids, scores = [], []
    skipped = dict.fromkeys(REASONS, 0)
    t_search = 0.0
    with tqdm(total=hi - lo, desc="neighbors", unit="doc") as bar:
        for s in range(0, hi - lo, BLOCK):
            t1 = time.perf_counter()
            cand = index.search(searcher, queries[s:s + BLOCK], r.candidates + int(same_bank))
            t_search += time.perf_counter() - t1
            i, sc, sk = select(self_ids[s:s + BLOCK], *cand, bank, pairs, r)
            ids.append(i), scores.append(sc)
            skipped = {k: skipped[k] + sk[k] for k in REASONS}
            bar.update(len(i))
    ids = np.concatenate(ids) if ids else np.full((0, r.k), -1, np.int64)
    scores = np.concatenate(scores) if scores else np.full((0, r.k), -np.inf, np.float32)
    seconds = time.perf_counter() - t0
    summary = {"documents": hi - lo, "range": [lo, hi], "seconds": round(seconds, 2),
               "embed_seconds": round(t_embed, 2), "search_seconds": round(t_search, 2),
               "skipped": skipped, "filled": int((ids >= 0).sum())}
    if num_shards == 1:
        return write_table(cfg, ids, scores, [summary], index_manifest)
    path = shard_path(out, shard, num_shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=ids, scores=scores, summary=json.dumps(summary))
    tmp.rename(path)
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
        with np.load(path) as z:
            summary = json.loads(str(z["summary"]))
            if summary["range"] != list(shard_range(n, s, num_shards)):
                raise ValueError(f"{path}: covers documents {summary['range']}, expected "
                                 f"{list(shard_range(n, s, num_shards))} of {n}")
            ids.append(z["ids"]), scores.append(z["scores"]), summaries.append(summary)
    index_manifest = json.loads((out.index / index.MANIFEST).read_text())
    return write_table(cfg, np.concatenate(ids), np.concatenate(scores), summaries,
                       index_manifest)


def write_table(cfg: Config, ids: np.ndarray, scores: np.ndarray, summaries: list[dict],
                index_manifest: dict) -> dict:
    out = retrieval_dir(cfg)
    for path, a in ((out.neighbors, ids.astype(np.int64)), (out.scores, scores.astype(np.float32))):
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, a)
        tmp.rename(path)
    filled = ids >= 0
    skipped = {k: sum(s["skipped"][k] for s in summaries) for k in REASONS}
    seconds = sum(s["seconds"] for s in summaries)
    manifest = {
        "documents": int(len(ids)), "k": int(ids.shape[1]), "data_dir": train_dir(cfg),
        "bank": bank_dir(cfg), "same_bank": _same(train_dir(cfg), bank_dir(cfg)),
        "filled_fraction": round(float(filled.mean()), 4) if ids.size else 0.0,
        "rows_with_k": int(filled.all(1).sum()),
        "mean_score": round(float(scores[filled].mean()), 4) if filled.any() else None,
        "skipped": skipped, "shards": len(summaries), "seconds": round(seconds, 2),
        "documents_per_second": round(len(ids) / max(seconds, 1e-9), 1),
        "index": index_manifest, "retrieval": cfg.to_dict()["retrieval"],
    }
    out.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
