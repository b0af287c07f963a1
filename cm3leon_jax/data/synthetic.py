"""A built-in synthetic token source with the CM3Leon document shape, for runs without data.

Two forms. Rows for training (`synthetic_batches`): each row packs documents `caption <break> image <eos>` into seq_len + 1 tokens. Captions
follow a noisy Markov chain over a few text ids and image tokens copy the caption through
a fixed code map, so both the text and the image loss can fall. Row i depends only on
(seed, i), and global batch n is rows [n*B, (n+1)*B) split by process: the data order is
the same for any process count. It is served through grain so it shares the iterator,
state and checkpoint interface of the real pipeline. Documents at a config's shapes
(`synthetic_documents`, `synthetic_pools`) for looking at the real pipeline without data:
captions of 10-30 text tokens (~20, as CM3Leon's), the config's image tokens per image,
and retrieval pools of other documents; `cm3leon data-stats` writes them as a prepared
directory.
"""

from __future__ import annotations

import grain
import numpy as np

from cm3leon_jax.vocab import Vocab

TEXT_IDS = 64  # distinct caption tokens
IMAGE_TOKENS = 16  # image tokens per document


def synthetic_row(index: int, seed: int, seq_len: int, vocab: Vocab) -> dict:
    rng = np.random.default_rng([seed, index])
    n_text = min(TEXT_IDS, vocab.text_size)
    tokens, segments = [], []
    seg = 0
    while len(tokens) < seq_len + 1:
        seg += 1
        caption = [int(rng.integers(n_text))]
        for _ in range(int(rng.integers(3, 12))):
            nxt = (caption[-1] * 5 + 1) % n_text if rng.random() < 0.8 else rng.integers(n_text)
            caption.append(int(nxt))
        caption = np.asarray(caption)
        codes = (caption[np.arange(IMAGE_TOKENS) % len(caption)] * 7 + np.arange(IMAGE_TOKENS))
        doc = np.concatenate([vocab.text_ids(caption), [vocab.brk],
                              vocab.image_ids(codes % vocab.image_size), [vocab.eos]])
        tokens.extend(doc.tolist())
        segments.extend([seg] * len(doc))
    tokens = np.asarray(tokens[:seq_len + 1], np.int32)
    segments = np.asarray(segments[:seq_len + 1], np.int32)
    starts = np.flatnonzero(np.diff(segments, prepend=0))
    positions = np.arange(seq_len + 1) - np.repeat(starts, np.diff(np.append(starts, seq_len + 1)))
    same_doc = segments[1:] == segments[:-1]
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "positions": positions[:-1].astype(np.int32),
        "segment_ids": segments[:-1],
        "weights": same_doc.astype(np.float32),
    }


def synthetic_batches(vocab: Vocab, seq_len: int, global_batch: int, seed: int,
                      process_index: int = 0, process_count: int = 1):
    """A grain iterator of this process's rows of each global batch; `example_id` is the
    row index, which the train step ignores and crash/resume audits read."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
    local = global_batch // process_count
    ds = grain.MapDataset.range(2**40)
    # Global batch n holds rows [n*B, (n+1)*B); this process takes a contiguous block of it.
    ds = ds.map_with_index(lambda i, _: (i // local) * global_batch + process_index * local + i % local)
    ds = ds.map(lambda row: {**synthetic_row(int(row), seed, seq_len, vocab),
                             "example_id": np.int64(row)})
    ds = ds.batch(local, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def synthetic_documents(vocab: Vocab, count: int, image_tokens: int, seed: int = 0) -> list[dict]:
    """`count` documents as prepared records: a caption of 10-30 text ids, `image_tokens`
    image ids; document i depends only on (seed, i)."""
    docs = []
    for i in range(count):
        rng = np.random.default_rng([seed, i, 1])
        text = rng.integers(0, min(TEXT_IDS, vocab.text_size), int(rng.integers(10, 31)))
        codes = rng.integers(0, vocab.image_size, image_tokens)
        docs.append({"id": f"synthetic-{seed}-{i}", "caption": "", "text": vocab.text_ids(text),
                     "image": vocab.image_ids(codes)})
    return docs


def synthetic_pools(count: int, pool: int, seed: int = 0) -> np.ndarray:
    """int64 [count, pool]: for each document, `pool` other documents (a retrieval table)."""
    rng = np.random.default_rng([seed, 2])
    table = np.empty((count, pool), np.int64)
    for i in range(count):
        others = rng.choice(count - 1, size=min(pool, count - 1), replace=False)
        table[i, :others.size] = others + (others >= i)  # skip i itself
        table[i, others.size:] = -1
    return table
