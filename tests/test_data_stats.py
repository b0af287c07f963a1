"""`cm3leon data-stats` and the facts it counts: the real pipeline on synthetic documents at a
config's shapes."""

import json

import numpy as np
import pytest

from cm3leon_jax.data import pipeline
from cm3leon_jax.data.records import iter_documents
from cm3leon_jax.data.stats import write_synthetic
from conftest import CONFIGS, run_cli

SHAPES = ["data.seq_len=512", "model.max_seq_len=512"]  # room for 3 documents of 64 image tokens


def moved_spans(masked, vocab):
    """The token ids of each span CM3 moved to the end (`<mask:i> span <eoss>`)."""
    sentinels = np.flatnonzero(vocab.is_sentinel(masked))
    n = sentinels.size // 2
    ends = np.flatnonzero(masked == vocab.eoss)
    return [masked[sentinels[n + i] + 1:ends[i]].tolist() for i in range(n)]


def test_whole_caption_fact_is_the_moved_query_caption(tiny, tmp_path):
    cfg = write_synthetic(tiny(*SHAPES, "data.whole_segment=1.0", "data.cm3_lambda=1"),
                          tmp_path / "data", 200, 4)
    vocab = cfg.vocab.build()
    docs = list(iter_documents(cfg.data.dir))
    made = pipeline.examples(cfg)
    counts = {"caption": 0, "image": 0}
    for i in range(300):
        e = made[i]
        spans = moved_spans(np.append(e["inputs"], e["targets"][-1]), vocab)
        query = docs[e["document"]]
        assert e["caption_whole"] == (query["text"].tolist() in spans)
        assert e["image_whole"] == (query["image"].tolist() in spans)
        assert e["spans"] == len(spans) and e["retrieved"] == 2
        counts["caption"] += e["caption_whole"]
        counts["image"] += e["image_whole"]
    # one whole segment in every masked example, uniform over its 6 segments
    expected = 300 * (1 - np.exp(-1)) / 6
    assert abs(counts["caption"] - expected) < 4 * np.sqrt(expected), counts
    assert abs(counts["image"] - expected) < 4 * np.sqrt(expected), counts


@pytest.mark.parametrize("packing, fill", [("stream", 1.0), ("pad", None)])
def test_data_stats_cli(capsys, packing, fill):
    code, out, err = run_cli(capsys, "data-stats", "--config", str(CONFIGS / "tiny.yaml"),
                             "--examples", "120", "--json", *SHAPES, f"data.packing={packing}",
                             "data.cm3_lambda=0")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["data"] == "synthetic" and stats["examples"] == 120
    assert stats["retrieved_k"] == {"2": 120} and stats["spans"] == {"0": 120}
    assert stats["whole_caption_masked"] == stats["whole_image_masked"] == 0.0
    if fill is not None:
        assert stats["row_fill"] == fill
    else:  # one example per row: the fill is the mean example length over the row
        assert stats["row_fill"] == pytest.approx(stats["tokens_per_example"] / 512, abs=0.02)
    assert stats["real_tokens_per_step"] == round(stats["row_fill"] * 8 * 512)
