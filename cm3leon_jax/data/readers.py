"""The reader side of `cm3leon prepare`: records [start, stop) of a source -> checked
documents (caption pieces, pixels at the tokenizer resolution, meta) or skip tuples.

Runs in the prepare process or in spawned reader processes, which import only this module:
it needs numpy, the sources and the text tokenizer, not jax, so a reader starts fast.
"""

from __future__ import annotations

import collections
import json
import time

import numpy as np

from cm3leon_jax.data.sources import BadRecord, SourceError, check_caption, fit_image
from cm3leon_jax.tokenizers.text import TextTokenizer

_state: dict = {}


def init(source, text_model: bytes, resolution: int) -> None:
    _state.update(source=source, text=TextTokenizer(text_model), resolution=resolution)


def read_chunk(start: int, stop: int) -> tuple[list, dict]:
    """Records [start, stop) as document dicts (no image tokens yet) or skip tuples."""
    source, text, res = _state["source"], _state["text"], _state["resolution"]
    seconds = collections.Counter()
    out = []
    for i in range(start, stop):
        t0 = time.perf_counter()
        try:
            try:
                pair = source[i]
            except (BadRecord, SourceError):  # a changed shard stops the run: not a record
                raise
            except Exception as e:  # a reader bug or an unreadable record: name the record
                raise BadRecord("corrupt_image", f"index {i}", f"{type(e).__name__}: {e}") from e
            t1 = time.perf_counter()
            seconds["read"] += t1 - t0
            caption = check_caption(pair.caption, pair.id)
            if pair.image.dtype != np.uint8 or pair.image.ndim != 3 or pair.image.shape[2] != 3:
                raise BadRecord("wrong_shape", pair.id, f"image {pair.image.dtype} {pair.image.shape}")
            pixels = fit_image(pair.image, res)
            t2 = time.perf_counter()
            seconds["resize"] += t2 - t1
            pieces = text.encode(caption)
            if text.decode(pieces) != caption:
                raise BadRecord("lossy_text", pair.id, "caption does not survive encode/decode")
            seconds["text"] += time.perf_counter() - t2
            out.append({"id": pair.id, "caption": caption, "pieces": pieces, "pixels": pixels,
                        "meta": json.dumps(pair.meta)})
        except BadRecord as e:
            seconds["read"] += time.perf_counter() - t0
            out.append((e.record_id, e.reason, e.detail))
    return out, dict(seconds)


def ordered_chunks(pool, chunks: list[tuple[int, int]], window: int):
    """pool results of read_chunk in order, at most `window` chunks in flight (bounded memory)."""
    pending = collections.deque()
    it = iter(chunks)
    for chunk in it:
        pending.append(pool.apply_async(read_chunk, chunk) if pool else chunk)
        if len(pending) >= window:
            break
    while pending:
        head = pending.popleft()
        yield head.get() if pool else read_chunk(*head)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.apply_async(read_chunk, nxt) if pool else nxt)
