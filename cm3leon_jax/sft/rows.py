"""`cm3leon sft`'s training batches: SFT mixture draws -> tokenized -> framed -> packed rows,
served by grain by global row index (the same iterator, checkpoint state and elastic resume
as the synthetic source).

Row r is a pure function of (config, r): it packs draws r*(seq_len+1), r*(seq_len+1)+1, ...
of the mixture in order until the next one does not fit (that draw is dropped; draws are
with replacement, so skipping ids changes no task share). A row holds at most
(seq_len+1)/3 examples, so the draw ranges of different rows never overlap.

Each example is framed `<eos> example <eos>` (the pretraining document frame) and packed
with one segment id each (1, 2, ...; 0 is padding), positions restarting per example, no
loss across an example boundary. Two objectives (`sft.loss`):
- `cm3`: CM3Leon's SFT (§6: the pretraining objective on instruction + output): the framed
  example goes through the CM3 span transform of data/cm3.py with data.cm3_lambda /
  data.whole_segment / data.sentinel_weight, seeded by (data.seed, draw); with cm3_lambda 0 every
  target inside the example counts.
- `response`: Chameleon's prompt masking: only targets after the example's last `<break>`
  (the image to generate, or the edit/control target) and the closing `<eos>` count.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from cm3leon_jax.config import Config, ConfigError, DataConfig
from cm3leon_jax.data import cm3
from cm3leon_jax.sft.mixture import mixture_report
from cm3leon_jax.sft.source import SFTSource
from cm3leon_jax.tokenizers.directory import Tokenizers, load_tokenizers
from cm3leon_jax.train import weights
from cm3leon_jax.vocab import Vocab

TOKEN_CACHE = 1 << 16  # tokenized shapes examples kept per process (~4 bytes per token each)


def sft_tokenizers(cfg: Config) -> tuple[Tokenizers, str]:
    """The text and image tokenizers of the SFT data, checked against the vocabulary and
    sft.resolution."""
    found = weights.tokenizer_dir(cfg)
    if found is None:
        raise ConfigError(f"sft: {weights.NO_TOKENIZERS}")
    directory, where = found
    toks = load_tokenizers(directory, cfg.vocab.build(), where=where)
    if cfg.sft.resolution is not None and cfg.sft.resolution != toks.image.resolution:
        raise ConfigError(f"sft.resolution={cfg.sft.resolution} but {where} encodes "
                          f"{toks.image.resolution} px images")
    return toks, f"{where} ({directory})"


def response_mask(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """bool per token of `ids`: True after its last `<break>` (all True without one)."""
    breaks = np.flatnonzero(np.asarray(ids) == vocab.brk)
    mask = np.ones(len(ids), bool)
    if breaks.size:
        mask[:breaks[-1] + 1] = False
    return mask


def framed_example(ids: np.ndarray, vocab: Vocab, loss: str, data: DataConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, weights of predicting tokens[1:]) of `<eos> ids <eos>` under `loss`
    (`rng` draws the CM3 spans; the response loss draws nothing)."""
    framed = np.concatenate([[vocab.eos], np.asarray(ids, np.int32), [vocab.eos]]).astype(np.int32)
    if loss == "response":
        counted = np.concatenate([[False], response_mask(ids, vocab), [True]])
        return framed, counted[1:].astype(np.float32)
    masked, origin, _, _ = cm3.cm3_transform(framed, rng, vocab, data.cm3_lambda, data.seq_len + 1,
                                          data.whole_segment)
    weights = cm3.target_weights(masked, origin, np.zeros(framed.size, bool), vocab,
                                 data.sentinel_weight, 1.0)
    return masked, weights


def pack_row(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, vocab: Vocab) -> dict:
    """The train step's row from framed examples and their target weights (segment ids 1..,
    positions restarting per example, no loss across an example boundary)."""
    if sum(len(t) for t, _ in examples) > seq_len + 1:
        raise ValueError(f"examples of {sum(len(t) for t, _ in examples)} framed tokens do not "
                         f"fit a row of {seq_len + 1}")
    tokens = np.full(seq_len + 1, vocab.pad, np.int32)
    segments = np.zeros(seq_len + 1, np.int32)
    positions = np.zeros(seq_len + 1, np.int32)
    weights = np.zeros(seq_len, np.float32)
    at = 0
    for seg, (toks, w) in enumerate(examples, start=1):
        n = len(toks)
        tokens[at:at + n], segments[at:at + n], positions[at:at + n] = toks, seg, np.arange(n)
        weights[at:at + n - 1] = w
        at += n
    return {"inputs": tokens[:-1], "targets": tokens[1:], "positions": positions[:-1],
            "segment_ids": segments[:-1], "weights": weights}


@dataclasses.dataclass
class SFTRows:
    """Global row index -> one packed training row."""
    cfg: Config
    source: SFTSource
    text: object  # TextTokenizer
    image: object  # ImageTokenizer
    vocab: Vocab
    tokenizers_from: str = ""  # where the tokenizers came from (the log says it)

    encoded: dict = dataclasses.field(default_factory=dict, repr=False)  # example key -> ids

    def tokens(self, k: int) -> np.ndarray:
        """Draw k's ids. Shapes draws repeat (with replacement), and the VQ-GAN encode is most
        of a row's cost, so their ids are kept (up to TOKEN_CACHE examples) by example key."""
        key = self.source.example_key(k)
        if key is None:
            return self.source.tokens(k, self.text, self.image, self.vocab)
        ids = self.encoded.get(key)
        if ids is None:
            if len(self.encoded) >= TOKEN_CACHE:
                self.encoded.clear()
            ids = self.source.tokens(k, self.text, self.image, self.vocab)
            ids.setflags(write=False)
            self.encoded[key] = ids
        return ids

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokens(k)
        n, limit = len(ids) + 2, self.cfg.data.seq_len + 1
        if n > limit:
            raise ValueError(f"SFT draw {k} (task {self.source[k].task!r}) has {n} tokens with "
                             f"its <eos> frame, more than data.seq_len + 1 = {limit}")
        rng = np.random.default_rng([self.cfg.data.seed, k])
        return framed_example(ids, self.vocab, self.cfg.sft.loss, self.cfg.data, rng)

    def __call__(self, r: int) -> dict:
        stride = limit = self.cfg.data.seq_len + 1
        row, used = [], 0
        for k in range(r * stride, (r + 1) * stride):
            toks, w = self.example(k)
            if used + len(toks) > limit:
                break
            row.append((toks, w))
            used += len(toks)
        return pack_row(row, self.cfg.data.seq_len, self.vocab)


def sft_rows(cfg: Config) -> SFTRows:
    toks, where = sft_tokenizers(cfg)
    return SFTRows(cfg, SFTSource(cfg.sft, toks.image.resolution), toks.text, toks.image,
                   toks.vocab, where)


def sft_batches(cfg: Config, process_index: int = 0, process_count: int = 1, log=print):
    """A grain iterator of this process's rows of each global batch (global batch n holds
    rows [n*B, (n+1)*B)); `example_id` is the global row index."""
    global_batch = cfg.train.batch_size
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} not divisible by {process_count} "
                         "processes")
    local = global_batch // process_count
    rows = sft_rows(cfg)
    if process_index == 0:
        log(f"sft: loss={cfg.sft.loss}, tokenizers of {rows.tokenizers_from}, "
            f"{cfg.sft.source} tasks:\n{mixture_report(rows.source.shares)}")
    ds = grain.MapDataset.range(2**40)
    ds = ds.map_with_index(
        lambda i, _: (i // local) * global_batch + process_index * local + i % local)
    ds = ds.map(lambda r: {**rows(int(r)), "example_id": np.int64(r)})
    ds = ds.batch(local, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
