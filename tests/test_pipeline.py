"""The grain pipeline on a prepared directory written here: packing, process shards,
resumable state, checkpoints and training through it."""

import collections
import json

import numpy as np
import pytest

from cm3leon_jax import layout
from cm3leon_jax.config import ConfigError, load_config
from cm3leon_jax.data import pipeline
from cm3leon_jax.data.records import write_documents
from cm3leon_jax.train import checkpoint
from conftest import CONFIGS

N_DOCS = 96
N_TEXT = 32  # distinct caption tokens
IMAGE_TOKENS = 16


def structured_docs(vocab, n, seed=0):
    """Captions from a Markov chain; image tokens a fixed function of the caption, so both
    modalities are learnable (as the synthetic source)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        cap = [int(rng.integers(N_TEXT))]
        for _ in range(int(rng.integers(2, 9))):
            cap.append((cap[-1] * 5 + 1) % N_TEXT if rng.random() < 0.8 else int(rng.integers(N_TEXT)))
        cap = np.asarray(cap)
        codes = (cap[np.arange(IMAGE_TOKENS) % cap.size] * 7 + np.arange(IMAGE_TOKENS)) % vocab.image_size
        docs.append({"id": f"doc-{i}", "caption": " ".join(map(str, cap)),
                     "text": vocab.text_ids(cap), "image": vocab.image_ids(codes)})
    return docs


def prepare(root, cfg, n=N_DOCS, k=3):
    """A prepared directory: two shards, vocab.json and a neighbors table (documents with
    the same first caption token first; -1 where there is none)."""
    vocab = cfg.vocab.build()
    docs = structured_docs(vocab, n)
    write_documents(root, [docs[:n // 3], docs[n // 3:]])
    vocab.save(root / "vocab.json")
    first = np.array([d["text"][0] for d in docs])
    table = np.full((n, k), -1, np.int64)
    for i in range(n):
        same = [j for j in np.flatnonzero(first == first[i]) if j != i][:k]
        table[i, :len(same)] = same
    (root / "retrieval").mkdir()
    np.save(root / "retrieval" / "neighbors.npy", table)
    return docs, table


@pytest.fixture
def data(tiny, tmp_path):
    """tiny config on a prepared directory: data(overrides...) -> (cfg, docs, table)."""
    root = tmp_path / "prepared"
    docs, table = prepare(root, tiny())
    return lambda *o: (tiny(f"data.dir={root}", *o), docs, table)


def example_bytes(ex):
    return tuple(np.asarray(ex[k]).tobytes() for k in ("inputs", "targets", "weights"))


def test_packing_keeps_every_token(data):
    cfg, docs, table = data("data.seq_len=64", "model.max_seq_len=64", "data.cm3_lambda=2",
                            "data.packing=pack")
    vocab = cfg.vocab.build()
    it = pipeline.batches(cfg, log=lambda _: None)
    rows = [next(it) for _ in range(12)]
    segments, out_tokens = [], 0
    for b in rows:
        assert set(b) == {"inputs", "targets", "positions", "segment_ids", "weights"}
        assert all(v.shape == (8, 64) for v in b.values())
        for r in range(8):
            seg = b["segment_ids"][r]
            out_tokens += int((seg > 0).sum())
            assert np.all(b["weights"][r][seg == 0] == 0) and np.all(b["inputs"][r][seg == 0] == 0)
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(b["positions"][r][idx], np.arange(idx.size))
                segments.append(example_bytes({k: b[k][r][idx] for k in ("inputs", "targets", "weights")}))
    ex = pipeline.examples(cfg)
    made = [ex[i] for i in range(len(segments))]
    # the rows hold exactly the first len(segments) examples, each whole and unchanged
    assert sorted(segments) == sorted(example_bytes(e) for e in made)
    # count in = count out + truncation: each example's assembled length recomputed from the
    # documents and the neighbors table; an example of m tokens with n spans gives
    # m - truncated + 3n - 1 (input, target) pairs
    doc_len = [d["text"].size + d["image"].size + 1 for d in docs]
    tokens_in = truncated = spans_total = 0
    table_file = str(layout.retrieval_dir(cfg).neighbors)
    maker = pipeline.ExampleMaker(str(cfg.data.dir), table_file, cfg.data.k, vocab, cfg.data)
    for pos, e in enumerate(made):
        # the draw is the first use of the example's randomness (data.seed, position)
        nbrs = maker.draw(e["document"], np.random.default_rng([cfg.data.seed, pos]))
        pool = {j for j in table[e["document"]] if j >= 0}
        assert set(nbrs) <= pool and len(nbrs) == len(set(nbrs)) == min(cfg.data.k, len(pool))
        assert e["retrieved"] == len(nbrs)
        assembled = 2 + doc_len[e["document"]] + sum(doc_len[j] + 1 for j in nbrs)
        spans = int(vocab.is_sentinel(np.append(e["inputs"], e["targets"][-1])).sum()) // 2
        assert e["inputs"].size == assembled - e["truncated"] + 3 * spans - 1
        tokens_in += assembled
        truncated += e["truncated"]
        spans_total += spans
    assert out_tokens == tokens_in - truncated + 3 * spans_total - len(made)
    assert truncated > 0 and spans_total > 0  # both paths exercised
    print(f"packed {len(made)} examples: {tokens_in} tokens in, {truncated} truncated, "
          f"{out_tokens} pairs out, fill {out_tokens / (12 * 8 * 64):.2f}")


def test_retrieved_documents_are_redrawn_at_every_read(data):
    """Each read draws k distinct documents of the pool uniformly, from (seed, position)
    alone: another epoch (another position) draws afresh, the same position draws the same."""
    cfg, _, table = data()
    maker = pipeline.ExampleMaker(str(cfg.data.dir), str(layout.retrieval_dir(cfg).neighbors),
                                  cfg.data.k, cfg.vocab.build(), cfg.data)
    doc = next(i for i, row in enumerate(table) if (row >= 0).sum() == 3)
    draw = lambda pos: tuple(sorted(maker.draw(doc, np.random.default_rng([cfg.data.seed, pos]))))
    draws = [draw(pos) for pos in range(600)]
    assert draws == [draw(pos) for pos in range(600)]
    counts = {pair: draws.count(pair) for pair in set(draws)}
    assert len(counts) == 3 and all(len(set(p)) == 2 and set(p) <= set(table[doc]) for p in counts)
    assert all(160 <= c <= 240 for c in counts.values())  # 200 each; binomial sd 11.5
    # the train log's histogram is that of the first examples, as made
    lines = []
    it = pipeline.batches(cfg, log=lines.append)
    for _ in range(200):
        if len(lines) == 2:
            break
        next(it)
    made = pipeline.examples(cfg)
    want = collections.Counter(int(made[i]["retrieved"]) for i in range(pipeline.LOGGED_EXAMPLES))
    assert lines[1].startswith(f"data: retrieved documents per example, first 256: "
                               f"{dict(sorted(want.items()))};")


def test_retrieved_documents_come_from_the_bank(tiny, tmp_path):
    """With `retrieval.bank`, table ids index the bank: its documents are the ones put in
    front of the query (and a bank id equal to the query's index is no self-match)."""
    from cm3leon_jax.data import sequences

    cfg = tiny()
    vocab = cfg.vocab.build()
    prepare(tmp_path / "train", cfg)
    bank_docs = structured_docs(vocab, 40, seed=7)
    write_documents(tmp_path / "bank", [bank_docs])
    vocab.save(tmp_path / "bank" / "vocab.json")
    table = (np.arange(N_DOCS) % 40)[:, None]
    np.save(tmp_path / "train" / "retrieval" / "neighbors.npy", table)
    cfg = tiny(f"data.dir={tmp_path / 'train'}", f"retrieval.bank={tmp_path / 'bank'}",
               "data.k=1", "data.cm3_lambda=0")
    made = pipeline.examples(cfg)
    for i in range(30):
        e = made[i]
        j = int(table[e["document"], 0])
        r1 = sequences.document(bank_docs[j]["text"], bank_docs[j]["image"], vocab)
        assert e["retrieved"] == 1
        np.testing.assert_array_equal(e["inputs"][1:1 + r1.size], r1)
    np.save(tmp_path / "train" / "retrieval" / "neighbors.npy", table + 40)
    with pytest.raises(ValueError, match=r"ids must be in \[-1, 40\) \(the documents of the "
                                         r"bank .*bank\), found \[40, 79\]"):
        pipeline.check_inputs(cfg)


def test_stream_rows_are_the_examples_back_to_back(data):
    """`stream` packing: every slot holds a real token, the rows read in order are this
    process's examples in order (an example cut at a row's end goes on at the start of the
    next row), and positions restart at 0 with every segment."""
    cfg, _, _ = data("data.cm3_lambda=2")  # examples shorter than a row: none truncated
    it = pipeline.batches(cfg, log=lambda _: None)
    rows = [next(it) for _ in range(6)]
    for b in rows:
        assert (b["segment_ids"] > 0).all()
        for seg, pos in zip(b["segment_ids"], b["positions"]):
            start = np.flatnonzero(np.diff(seg, prepend=0) != 0)
            within = np.arange(seg.size) - np.repeat(start, np.diff(np.append(start, seg.size)))
            np.testing.assert_array_equal(pos, within)
    got = {k: np.concatenate([r for b in rows for r in b[k]]) for k in pipeline.SEQUENCE}
    ex, made, n = pipeline.examples(cfg), [], 0
    while n < got["inputs"].size:
        made.append(ex[len(made)])
        n += made[-1]["inputs"].size
    for k in pipeline.SEQUENCE:
        want = np.concatenate([e[k] for e in made])[:got[k].size]
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    assert any(e["truncated"] == 0 for e in made) and len(made) > 6 * 8


def test_padding_puts_one_example_per_row(data):
    cfg, _, _ = data("data.packing=pad")
    b = next(pipeline.batches(cfg, log=lambda _: None))
    ex = pipeline.examples(cfg)
    for r in range(8):
        n = int((b["segment_ids"][r] == 1).sum())
        assert set(np.unique(b["segment_ids"][r])) <= {0, 1}
        np.testing.assert_array_equal(b["inputs"][r][:n], ex[r]["inputs"])


def test_processes_split_each_epoch(data):
    cfg, _, _ = data()
    one = pipeline.examples(cfg, 0, 1)
    for count in (2, 3):
        parts = [pipeline.examples(cfg, p, count) for p in range(count)]
        docs = [[parts[p][i]["document"] for i in range(N_DOCS // count)] for p in range(count)]
        flat = sum(docs, [])
        assert sorted(flat) == list(range(N_DOCS))  # disjoint, together one epoch
        for p in range(count):  # the same examples, only split differently
            for i in range(0, N_DOCS // count, 7):
                assert example_bytes(parts[p][i]) == example_bytes(one[i * count + p])
    epoch1 = [one[i]["document"] for i in range(N_DOCS)]
    epoch2 = [one[N_DOCS + i]["document"] for i in range(N_DOCS)]
    assert sorted(epoch2) == list(range(N_DOCS)) and epoch2 != epoch1  # reshuffled


# 16-token rows without spans: every example is cut to fill one row exactly, so each state
# sits at a row boundary (the stream packer's "no remainder" state must survive JSON)
@pytest.mark.parametrize("rows", [[], ["data.seq_len=16", "data.cm3_lambda=0"]],
                         ids=["mixed", "row_boundaries"])
def test_state_after_37_batches_resumes_exactly(data, tmp_path, rows):
    import jax.numpy as jnp

    cfg, _, _ = data("train.batch_size=2", *rows)
    it = pipeline.batches(cfg, log=lambda _: None)
    for _ in range(37):
        next(it)
    state = json.dumps(it.get_state())
    mngr = checkpoint.manager(tmp_path / "ckpt", 1)
    checkpoint.save(mngr, 37, {"x": jnp.zeros(2)}, it, cfg)
    mngr.wait_until_finished()
    expect = [next(it) for _ in range(20)]
    again = pipeline.batches(cfg, log=lambda _: None)
    again.set_state(json.loads(state))
    restored = pipeline.batches(cfg, log=lambda _: None)
    checkpoint.restore(mngr, 37, {"x": jnp.zeros(2)}, restored, cfg)
    with pytest.raises(ConfigError, match="written with data.workers=0 but the config says 2"):
        checkpoint.restore(mngr, 37, {"x": jnp.zeros(2)}, restored,
                           data("train.batch_size=2", "data.workers=2", *rows)[0])
    with pytest.raises(ConfigError, match="written with data.packing=stream but the config "
                                          "says pack; resume with data.packing=stream"):
        checkpoint.restore(mngr, 37, {"x": jnp.zeros(2)}, restored,
                           data("train.batch_size=2", "data.packing=pack", *rows)[0])
    for resumed in (again, restored):
        got = [next(resumed) for _ in range(20)]
        for a, b in zip(expect, got):
            assert a.keys() == b.keys()
            assert all(a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in a)


def test_missing_table_trains_with_k0_and_bad_inputs_fail(data, tmp_path):
    cfg, _, _ = data(f"retrieval.dir={tmp_path / 'nowhere'}")
    lines = []
    pipeline.batches(cfg, log=lines.append)
    assert "no neighbors table" in lines[0] and "examples without retrieved documents" in lines[0]
    assert pipeline.examples(cfg)[0]["retrieved"] == 0
    cfg, _, _ = data("data.k=4")
    with pytest.raises(ValueError, match="data.k=4 but .*neighbors.npy holds only 3"):
        pipeline.batches(cfg)
    cfg, _, _ = data("vocab.text_size=600")
    with pytest.raises(ValueError, match="vocab.json says"):
        pipeline.batches(cfg)
    bad = tmp_path / "bad"
    cfg, _, _ = data(f"data.dir={bad}")
    prepare(bad, cfg)
    np.save(bad / "retrieval" / "neighbors.npy", np.full((N_DOCS, 2), N_DOCS))
    with pytest.raises(ValueError, match=r"neighbor ids must be in \[-1, 96\) \(the documents "
                                         r"of the bank .*\), found"):
        pipeline.batches(cfg)
    # a deleted shard is named before anything trains (it used to train on the rest)
    (bad / "documents" / "shard-00001-of-00002.array_record").unlink()
    with pytest.raises(ConfigError, match=r"shard shard-00001-of-00002.array_record of the "
                                          r"manifest is missing"):
        pipeline.batches(cfg)


@pytest.mark.multiprocess
def test_workers_give_the_same_batches(data):
    """Workers only make examples (packing stays here): same batches for any worker count;
    the state (it holds each worker's position) round-trips."""
    cfg, _, _ = data()
    want = pipeline.batches(cfg, log=lambda _: None)
    expect = [next(want) for _ in range(6)]
    it = pipeline.batches(load_config(CONFIGS / "tiny.yaml", [f"data.dir={cfg.data.dir}",
                                                              "data.workers=2"]),
                          log=lambda _: None)
    try:
        got = [next(it) for _ in range(4)]
        state = it.get_state()
        got += [next(it) for _ in range(2)]
        for a, b in zip(expect, got):
            assert all(a[k].tobytes() == b[k].tobytes() for k in a)
        it.set_state(state)
        for a in expect[4:]:
            assert all(a[k].tobytes() == v.tobytes() for k, v in next(it).items())
    finally:
        it.close()


@pytest.mark.slow
def test_train_through_the_pipeline(data, tmp_path):
    from cm3leon_jax.train.trainer import train

    cfg, _, _ = data("train.steps=60", "data.retrieved_dropout=0.3", "data.sentinel_weight=0",
                     "data.retrieved_weight=0.5", "data.image_first=0.2", "data.whole_segment=0.1")
    hist = train(cfg, tmp_path / "run").history
    first, last = hist[0], hist[-1]
    assert last["text_loss"] < first["text_loss"] - 1.5
    assert last["image_loss"] < first["image_loss"] - 1.5
    print(f"text loss {first['text_loss']:.3f} -> {last['text_loss']:.3f}, image loss "
          f"{first['image_loss']:.3f} -> {last['image_loss']:.3f}")


@pytest.mark.parametrize("override, message", [
    ("data.whole_segment=1.5", r"data.whole_segment=1.5 must be in \[0, 1\]"),
    ("data.k=-1", "data.k=-1 must be >= 0"),
    ("data.packing=split", r"data.packing='split' is not one of \['stream', 'pack', 'pad'\]"),
    ("data.retrieved_weight=-0.1", "data.retrieved_weight=-0.1 must be >= 0"),
])
def test_data_keys_are_validated(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


@pytest.mark.multiprocess
def test_workers_die_with_their_process(data, tmp_path):
    """kill -9 of the process that reads with data.workers leaves no worker behind holding
    memory: each worker watches its parent and exits when it is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg, _, _ = data("data.workers=2")
    script = tmp_path / "reader.py"
    script.write_text(
        "import time\n"
        "from cm3leon_jax.config import load_config\n"
        "from cm3leon_jax.data import pipeline\n"
        "if __name__ == '__main__':  # grain spawns its workers\n"
        f"    cfg = load_config({str(CONFIGS / 'tiny.yaml')!r}, "
        f"['data.dir={cfg.data.dir}', 'data.workers=2'])\n"
        "    it = pipeline.batches(cfg, log=lambda _: None)\n"
        "    next(it)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "ready"

    def descendants(pid):
        children = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = open(f"/proc/{d}/stat").read()
                except OSError:
                    continue
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out += children.get(p, [])
            todo += children.get(p, [])
        return out

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    workers = descendants(proc.pid)
    assert len(workers) >= 2, workers  # the two grain workers (and any helper process)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if alive(w)], "workers outlived their process"
