"""The training input: prepared documents + neighbors -> CM3 examples -> packed batches.

    range(N) -> seeded global shuffle, reshuffled each epoch -> (global position, document)
      -> this process's share: positions p, p + P, p + 2P, ...
      -> example (grain map): read the document, draw k distinct documents from its row of
         the neighbors table (its text- and image-query pools), retrieved-document dropout,
         image-first coin per document, `<eos> r1 <break> r2 <break> q <eos>`,
         CM3 masking, cut to seq_len + 1, inputs/targets/weights
      -> [mp_prefetch workers] -> rows of seq_len (`data.packing`) -> batch of
         train.batch_size / P rows -> the step's batch dict

Rows (`data.packing`): `stream` (the default) concatenates the examples and cuts the stream
into rows, so every slot holds a real token; an example cut at a row's end goes on at the
start of the next as its own segment (positions from 0, attending only to itself), as
metaseq's block mode streams documents across blocks. At paper shapes an example is ~3,140
tokens: first-fit `pack` fits one per 4,096-token row (~77% real tokens), `pad` puts one
example per row. Segment ids keep examples apart in attention in every mode.

Each example's randomness comes from (data.seed, its global position) only, so an example is
the same whatever the process count or worker count; only the split (and, per process, the
packing of the examples it gets) changes. Workers only make examples; packing and batching
stay in the main process, so the output does not depend on `data.workers` either. The
returned grain iterator's state goes into the orbax checkpoint (train/checkpoint.py).

The prepared directories and the neighbors table may be on cloud storage (storage.py):
grain reads `gs://` shards itself; a remote table is read into memory once per process
(a local one is memory-mapped).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import time
from typing import Callable, NamedTuple, Optional

import grain
import numpy as np
from absl import flags
from tqdm import tqdm

from cm3leon_jax import layout, storage
from cm3leon_jax.config import Config, DataConfig
from cm3leon_jax.data import cm3, sequences
from cm3leon_jax.data.records import check_documents, decode_document, open_documents
from cm3leon_jax.data.synthetic import synthetic_batches
from cm3leon_jax.vocab import Vocab

SEQUENCE = ("inputs", "targets", "weights")  # an example's per-token features (the rest: its facts)
READ_THREADS = 2
READ_BUFFER = 64
LOGGED_EXAMPLES = 256  # the train log's retrieved-k histogram: process 0's first examples


# --- inputs ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _documents(data_dir: str):
    """The ArrayRecord source, opened once per process (and once per worker); `check_inputs`
    has held the directory to its manifest already."""
    return open_documents(data_dir, check=False)


@functools.lru_cache(maxsize=4)
def _neighbors(path: str) -> np.ndarray:
    return storage.load_npy(path, mmap=True)


class Inputs(NamedTuple):
    """What the examples read: the training documents, the neighbors table (None: k = 0)
    and the memory bank its ids index (None: the training documents themselves)."""
    documents: int
    table: Optional[str]
    k: int
    bank: Optional[str]


def _check_prepared(root: storage.Path, cfg: Config, what: str) -> int:
    """Documents in the prepared directory `root` after checking it against the config."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what}={str(root)!r} is not a directory")
    n = check_documents(root, what)
    vocab_file = layout.DataDir(root).vocab
    if not vocab_file.exists():
        raise FileNotFoundError(f"{vocab_file} is missing: {what} must be a prepared "
                                "directory (cm3leon prepare)")
    saved = Vocab.load(vocab_file)
    if saved != cfg.vocab.build():
        raise ValueError(f"{vocab_file} says {saved} but the config's vocab section builds "
                         f"{cfg.vocab.build()}; set vocab.* to match the prepared data")
    if n == 0:
        raise ValueError(f"{root}: the document shards hold no records")
    return n


def check_inputs(cfg: Config) -> Inputs:
    """The inputs after checking the data directory, the bank and the neighbors table
    against the config; every problem is reported here, before any batch is made."""
    d = cfg.data
    n_docs = _check_prepared(storage.path(d.dir), cfg, "data.dir")
    path = layout.retrieval_dir(cfg).neighbors
    if d.k == 0 or not path.exists():
        return Inputs(n_docs, None, 0, None)
    bank = layout.bank_dir(cfg)
    own_bank = storage.absolute(bank) == storage.absolute(d.dir)
    n_bank = n_docs if own_bank else _check_prepared(bank, cfg, "retrieval.bank")
    table = storage.load_npy(path, mmap=True)
    if table.ndim != 2 or table.shape[0] != n_docs or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{path}: expected an integer [documents={n_docs}, pool] table, got "
                         f"{table.dtype} {list(table.shape)}")
    if d.k > table.shape[1]:
        raise ValueError(f"data.k={d.k} but {path} holds only {table.shape[1]} neighbors "
                         "per document")
    lo, hi = (int(table.min()), int(table.max())) if table.size else (-1, -1)
    if lo < -1 or hi >= n_bank:
        raise ValueError(f"{path}: neighbor ids must be in [-1, {n_bank}) (the documents of "
                         f"the bank {bank}), found [{lo}, {hi}]")
    return Inputs(n_docs, str(path), d.k, None if own_bank else str(bank))


# --- one example -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExampleMaker:
    """(global position, document index) -> one masked example and its facts; picklable
    for workers.

    The retrieved documents are drawn from the document's pool (its row of the neighbors
    table: the text-query and image-query candidates) at every read: k distinct ones,
    uniformly, by the example's own randomness (data.seed, position), so each epoch draws
    afresh and a resumed run draws the same.
    """
    data_dir: str
    neighbors: Optional[str]
    k: int
    vocab: Vocab
    data: DataConfig
    bank: Optional[str] = None  # the table's memory bank; None: the training documents

    def document(self, index: int, rng: np.random.Generator,
                 source: str) -> tuple[np.ndarray, dict]:
        """Document `index` of the prepared directory `source`: its tokens, and where its
        caption and image are in them."""
        doc = decode_document(_documents(source)[index])
        first = bool(self.data.image_first) and rng.random() < self.data.image_first
        tokens = sequences.document(doc["text"], doc["image"], self.vocab, first,
                                    where=f"{source} document {index} ({doc['id']!r})")
        t, m = doc["text"].size, doc["image"].size
        gap = 1 if t and m else 0  # the <break> between them
        caption = (m + gap, m + gap + t) if first else (0, t)
        image = (0, m) if first else (t + gap, t + gap + m)
        return tokens, {"caption": caption if t else None, "image": image if m else None}

    def draw(self, index: int, rng: np.random.Generator) -> list[int]:
        """k distinct bank documents of `index`'s pool (fewer when the pool is smaller)."""
        row = _neighbors(self.neighbors)[index]
        own = -1 if self.bank else index  # a document never retrieves itself
        pool = [int(j) for j in dict.fromkeys(row.tolist()) if j >= 0 and j != own]
        picks = rng.permutation(len(pool))[:self.k] if pool else []
        return [pool[i] for i in picks]

    def __call__(self, item) -> dict:
        pos, index = int(item[0]), int(item[1])
        d = self.data
        rng = np.random.default_rng([d.seed, pos])
        retrieved = []
        for j in (self.draw(index, rng) if self.k else []):
            if d.retrieved_dropout and rng.random() < d.retrieved_dropout:
                continue
            retrieved.append(self.document(j, rng, self.bank or self.data_dir)[0])
        query, where = self.document(index, rng, self.data_dir)
        tokens, is_retrieved = sequences.example(query, retrieved, self.vocab)
        masked, origin, cut, spans = cm3.cm3_transform(tokens, rng, self.vocab, d.cm3_lambda,
                                                       d.seq_len + 1, d.whole_segment)
        weights = cm3.target_weights(masked, origin, is_retrieved, self.vocab,
                                     d.sentinel_weight, d.retrieved_weight)
        q0 = tokens.size - 1 - query.size  # the query's first token in the example
        whole = lambda r: r is not None and (q0 + r[0], q0 + r[1]) in spans
        return {"inputs": masked[:-1], "targets": masked[1:], "weights": weights,
                "document": index, "retrieved": len(retrieved), "truncated": cut,
                "spans": len(spans), "caption_whole": whole(where["caption"]),
                "image_whole": whole(where["image"])}


def _position_and_document(pos: int, doc) -> tuple[int, int]:
    return pos, int(doc)


def examples(cfg: Config, process_index: int = 0, process_count: int = 1,
             inputs: Inputs | None = None):
    """This process's examples as a grain MapDataset (infinite: epochs reshuffle)."""
    n_docs, table, k, bank = inputs or check_inputs(cfg)
    ds = grain.MapDataset.range(n_docs).seed(cfg.data.seed).shuffle().repeat(None)
    ds = ds.map_with_index(_position_and_document)
    ds = ds[process_index::process_count]
    return ds.map(ExampleMaker(str(storage.path(cfg.data.dir)), table, k, cfg.vocab.build(),
                               cfg.data, bank))


# --- batches -----------------------------------------------------------------------------

def to_batch(packed: dict) -> dict:
    """grain's packed features -> the train step's batch dict."""
    return {"inputs": packed["inputs"], "targets": packed["targets"],
            "positions": packed["inputs_positions"], "segment_ids": packed["inputs_segment_ids"],
            "weights": packed["weights"]}


def _allow_workers() -> None:
    """grain 0.2.18 reads an absl flag in mp_prefetch; outside absl.app.run it is unparsed
    (grain issue #1355)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _die_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """grain worker init: exit when `parent` (the process that built the pipeline) is gone.
    grain's workers outlive a trainer killed with SIGKILL (nothing tells them), each
    holding its share of memory; a daemon thread polls once a second whether the worker
    was re-parented."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def batches(cfg: Config, process_index: int = 0, process_count: int = 1, log=tqdm.write):
    """The grain iterator of this process's [batch_size / process_count, seq_len] batches."""
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                         f"{process_count} processes")
    local = cfg.train.batch_size // process_count
    inputs = check_inputs(cfg)
    n_docs, table, k, _ = inputs
    if process_index == 0:
        why = ("" if table else " (data.k=0)" if cfg.data.k == 0 else
               f" (no neighbors table at {layout.retrieval_dir(cfg).neighbors}): examples "
               "without retrieved documents")
        log(f"data: {n_docs} documents in {cfg.data.dir}, k={k} retrieved{why}, "
            f"{cfg.data.packing} rows of {cfg.data.seq_len}, {local} rows per process")
    it = examples(cfg, process_index, process_count, inputs).to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER))
    if cfg.data.workers:
        _allow_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.workers),
                            worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
    if process_index == 0 and k:
        it = it.map(RetrievedLog(k, cfg.data.retrieved_dropout, log))
    length = {key: cfg.data.seq_len for key in SEQUENCE}
    if cfg.data.packing == "stream":
        it = grain.experimental.ConcatThenSplitIterDataset(it.map(_sequences),
                                                           length_struct=length)
    else:
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=length, num_packing_bins=local, seed=cfg.data.seed,
            shuffle_bins=False, max_sequences_per_bin=1 if cfg.data.packing == "pad" else None)
    it = it.batch(local, drop_remainder=True).map(to_batch)
    return _JsonState(iter(it))


@dataclasses.dataclass
class RetrievedLog:
    """Passes examples through; once LOGGED_EXAMPLES have passed, logs how many documents
    they had retrieved, so a run short of neighbors says so in its first lines."""
    k: int
    dropout: float
    log: Callable[[str], None]
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __call__(self, example: dict) -> dict:
        if self.counts.total() < LOGGED_EXAMPLES:
            self.counts[int(example["retrieved"])] += 1
            if self.counts.total() == LOGGED_EXAMPLES:
                short = sum(n for j, n in self.counts.items() if j < self.k) / LOGGED_EXAMPLES
                self.log(f"data: retrieved documents per example, first {LOGGED_EXAMPLES}: "
                         f"{dict(sorted(self.counts.items()))}; {short:.0%} below data.k="
                         f"{self.k} (data.retrieved_dropout={self.dropout})")
        return example


class _JsonState(grain.DatasetIterator):
    """The batches, restorable from a state that went through JSON (the orbax checkpoint):
    grain 0.2.18's ConcatThenSplit tells "no remainder" by comparing its slices with the
    tuple (-1, -1), and JSON makes them lists, so a restore at a row boundary skipped an
    example. Its set_state turns them back into tuples."""

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state):
    if not isinstance(state, dict):
        return state
    out = {key: _slices_as_tuples(value) for key, value in state.items()}
    if isinstance(out.get("remainder_slices"), dict):
        out["remainder_slices"] = {f: tuple(s) for f, s in out["remainder_slices"].items()}
    return out


def _sequences(example: dict) -> dict:
    return {k: example[k] for k in SEQUENCE}


def train_batches(cfg: Config, process_index: int = 0, process_count: int = 1):
    """This process's pretraining batches: the prepared data (`data.dir`), else the
    built-in synthetic source."""
    if cfg.data.dir is not None:
        return batches(cfg, process_index, process_count)
    return synthetic_batches(cfg.vocab.build(), cfg.data.seq_len, cfg.train.batch_size,
                             cfg.data.seed, process_index, process_count)
