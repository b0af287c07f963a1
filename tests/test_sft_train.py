"""`cm3leon sft`: fine-tuning on the SFT mixture from a run directory, through train().

The init is a real run checkpoint with random std-0.3 parameters (test_export.write_run);
the tokenizers are a real sentencepiece model and a randomly initialised VQ-GAN (4x4 codes
per 32 px image) saved under the layout's names (layout.DataDir).
"""

import jax
import numpy as np
import pytest

from cm3leon_jax.cli import main as cli
from cm3leon_jax.config import ConfigError, VQGANConfig, load_config
from cm3leon_jax.data.cm3 import unmask
from cm3leon_jax.layout import DataDir
from cm3leon_jax.sft.rows import framed_example, response_mask, sft_batches, sft_rows
from cm3leon_jax.sft.shapes_suite import ShapesSFT
from cm3leon_jax.config.sft import SHAPES_TASKS
from cm3leon_jax.sft.tasks import tokenize_example
from cm3leon_jax.train import weights as weights_lib
from cm3leon_jax.train.trainer import train
from cm3leon_jax.train.metrics import read_metrics
from cm3leon_jax.train.step import loss_sums
from conftest import CONFIGS
from test_export import host, mesh_of, write_run

VQ = VQGANConfig(resolution=32, base_channels=8, channel_mult=(1, 2, 4, 8), num_res_blocks=1,
                 mid_attn=False, norm_groups=4, z_channels=8, embed_dim=8, codebook_size=512)
SHAPE = ["model.max_seq_len=256", "data.seq_len=256"]  # room for the longest examples
BASE = [*SHAPE, "optimizer.warmup_steps=1", "optimizer.decay_steps=4",
        "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from cm3leon_jax.tokenizers.image import ImageTokenizer
    from cm3leon_jax.tokenizers.text import train_text_tokenizer

    d = tmp_path_factory.mktemp("tokenizers")
    suite = ShapesSFT(seed=0, resolution=VQ.resolution)
    texts = [s for t in SHAPES_TASKS for i in range(10)
             for s in suite.example(t, "train", i).segments if isinstance(s, str)]
    train_text_tokenizer(texts, 320).save(DataDir(d).text_tokenizer)
    ImageTokenizer.create(VQ, seed=0, batch_size=4).save(DataDir(d).image_tokenizer)
    return d


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_run(load_config(CONFIGS / "tiny.yaml", SHAPE), tmp_path_factory.mktemp("pre"))


def sft_cfg(toks, pretrained, *more):
    return load_config(CONFIGS / "tiny.yaml", [*BASE, f"sft.tokenizers={toks}",
                                               f"train.init_from={pretrained}", *more])


def sft_train(cfg, workdir):
    """What `cm3leon sft` runs: the trainer on the mixture's rows."""
    return train(cfg, workdir, lambda: sft_batches(cfg)).history


def sft_row(ids, seq_len, vocab, loss):
    """The reference row, written out directly: examples framed `<eos> x <eos>` back to back,
    segment ids 1.., positions from 0 in each; a target counts when it is inside its example
    ("all") and, for "response", after the example's last <break>."""
    tokens, segs, pos, counted = [], [], [], []
    for seg, x in enumerate(ids, start=1):
        framed = [vocab.eos, *x, vocab.eos]
        last_brk = max((i for i, t in enumerate(x) if t == vocab.brk), default=-1)
        tokens += framed
        segs += [seg] * len(framed)
        pos += range(len(framed))
        counted += [k > 0 and (loss == "all" or k - 1 > last_brk) for k in range(len(framed))]
    pad = seq_len + 1 - len(tokens)
    tokens, segs = np.array(tokens + [vocab.pad] * pad), np.array(segs + [0] * pad)
    counted = np.array(counted + [False] * pad)
    weights = (segs[1:] == segs[:-1]) & (segs[1:] > 0) & counted[1:]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "positions": np.array(pos + [0] * pad)[:-1],
            "segment_ids": segs[:-1], "weights": weights.astype(np.float32)}


@pytest.mark.slow
def test_sft_starts_from_the_run_weights_at_step_0(toks, pretrained, tmp_path):
    assert cli(["sft", "--config", str(CONFIGS / "tiny.yaml"), "--init", str(pretrained),
                "--workdir", str(tmp_path / "ft"), *BASE, "train.steps=1",
                f"sft.tokenizers={toks}"]) == 0
    (first,) = read_metrics(tmp_path / "ft")
    assert first["step"] == 1  # the run's optimizer state (step 3) was not carried over
    cfg = sft_cfg(toks, pretrained, "train.steps=1")
    batch = next(sft_batches(cfg))
    assert batch.pop("example_id").tolist() == list(range(8))
    weights = weights_lib.load(pretrained, mesh=mesh_of(1, 1, 1))
    sums = loss_sums(weights.mdef.bind(host(weights.params)),
                     jax.tree.map(np.asarray, batch), cfg.vocab.build())
    np.testing.assert_allclose(first["loss"], sums["ce"] / sums["w"], rtol=1e-5)


@pytest.mark.slow
def test_sft_resume_gives_identical_losses(toks, pretrained, tmp_path):
    full = sft_train(sft_cfg(toks, pretrained, "train.steps=3"), tmp_path / "full")
    a = sft_train(sft_cfg(toks, pretrained, "train.steps=1"), tmp_path / "split")
    b = sft_train(sft_cfg(toks, pretrained, "train.steps=3"), tmp_path / "split")
    assert [m["step"] for m in a + b] == [1, 2, 3]
    assert [m["loss"] for m in a + b] == [m["loss"] for m in full]


def test_response_loss_counts_only_the_response(toks, pretrained):
    cfg = sft_cfg(toks, pretrained, "sft.loss=response")
    rows = sft_rows(cfg)
    vocab = rows.vocab
    for r in range(3):
        row = rows(r)
        k0, n = r * (cfg.data.seq_len + 1), int(row["segment_ids"].max())
        ids = [rows.source.tokens(k, rows.text, rows.image, vocab) for k in range(k0, k0 + n)]
        want = sft_row(ids, cfg.data.seq_len, vocab, "response")
        for key in want:
            np.testing.assert_array_equal(row[key], want[key], err_msg=key)
        # independently: a target counts iff it is after its example's last <break>
        for seg, x in enumerate(ids, start=1):
            at = np.flatnonzero(row["segment_ids"] == seg)[0]
            w = row["weights"][at:at + len(x) + 1]  # predicting x and the closing <eos>
            after = np.append(response_mask(x, vocab), True)
            np.testing.assert_array_equal(w, after.astype(np.float32))
            assert after.sum() < len(x) + 1  # the prompt is there and does not count
        assert row["weights"][row["segment_ids"] == 0].sum() == 0


def test_cm3_loss_without_spans_is_the_plain_objective(toks, pretrained):
    cfg = sft_cfg(toks, pretrained, "data.cm3_lambda=0")
    rows = sft_rows(cfg)
    for r in range(2):
        row = rows(r)
        k0, n = r * (cfg.data.seq_len + 1), int(row["segment_ids"].max())
        ids = [rows.source.tokens(k, rows.text, rows.image, rows.vocab) for k in range(k0, k0 + n)]
        want = sft_row(ids, cfg.data.seq_len, rows.vocab, "all")
        for key in want:
            np.testing.assert_array_equal(row[key], want[key], err_msg=key)
    cfg = sft_cfg(toks, pretrained)  # data.cm3_lambda=1: spans moved, and they invert
    rows = sft_rows(cfg)
    row, x = rows(0), rows.source.tokens(0, rows.text, rows.image, rows.vocab)
    toks0, w = framed_example(x, rows.vocab, "cm3", cfg.data,
                              np.random.default_rng([cfg.data.seed, 0]))
    np.testing.assert_array_equal(row["inputs"][:len(toks0)], toks0)
    np.testing.assert_array_equal(unmask(toks0, rows.vocab),
                                  np.concatenate([[rows.vocab.eos], x, [rows.vocab.eos]]))
    assert any(rows.vocab.is_sentinel(rows(r)["inputs"]).any() for r in range(4))


@pytest.mark.slow
def test_token_cache_changes_no_row(toks, pretrained, monkeypatch):
    """Rows read with a warm cache (and across a cache flush) equal rows read cold."""
    cfg = sft_cfg(toks, pretrained)
    warm = sft_rows(cfg)
    order = [0, 1, 0, 2, 1, 3, 0]
    got = [warm(r) for r in order]
    assert 0 < len(warm.encoded) < sum(int(g["segment_ids"].max()) + 1 for g in got)
    for (task, index), ids in warm.encoded.items():  # a kept entry is that example's ids
        assert not ids.flags.writeable
        example = warm.source.suite.example(task, "train", index)
        np.testing.assert_array_equal(ids, tokenize_example(example, warm.text.encode,
                                                            warm.image.encode, warm.vocab))
    monkeypatch.setattr("cm3leon_jax.sft.rows.TOKEN_CACHE", 3)
    flushing = sft_rows(cfg)
    for r, row in zip(order, got):
        for rows in (sft_rows(cfg), flushing):
            cold = rows(r)
            for key in row:
                np.testing.assert_array_equal(row[key], cold[key], err_msg=key)
    assert len(flushing.encoded) <= 3


def test_bad_init_fails_before_compiling(toks, tmp_path, capsys):
    code = cli(["sft", "--config", str(CONFIGS / "tiny.yaml"), "--init", str(tmp_path / "no"),
                "--workdir", str(tmp_path / "ft"), f"sft.tokenizers={toks}"])
    assert code == 2
    assert f"train.init_from={tmp_path / 'no'}: does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "checkpoints").exists() or \
        not any((tmp_path / "ft" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"sft.loss='prefix' is not one of \['cm3', 'response'\]"):
        load_config(CONFIGS / "tiny.yaml", ["sft.loss=prefix"])
