"""`cm3leon generate` does what the demo does, on a micro demo run built in seconds (an
untrained image tokenizer, a 2-step dual encoder, its index, a 1-step model): --retrieve
places the query function's documents as training does, --rerank dual keeps the
candidate the dual encoder scores best, caption --candidates ranks by the likelihood a
plain forward pass gives, sampled captions are never empty, bad requests exit 2."""

import json

import jax
import numpy as np
import pytest
from conftest import CONFIGS, run_cli
from PIL import Image

from cm3leon_jax.config import load_config
from cm3leon_jax.data import records, sequences
from cm3leon_jax.demo import job as demo
from cm3leon_jax.eval.score import score_tokens
from cm3leon_jax.generate import tasks
from cm3leon_jax.layout import DemoDir, retrieval_dir
from cm3leon_jax.retrieval.query import Retriever
from cm3leon_jax.retrieval.train_encoder import load_encoder
from cm3leon_jax.tokenizers.image import ImageTokenizer
from cm3leon_jax.train import weights
from test_demo import MICRO, VQ

PROMPT = "a big red square"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """(run directory, its config): the demo's stages up to training, 24 scenes."""
    tmp = tmp_path_factory.mktemp("generate_cli")
    tok = tmp / "vq"
    ImageTokenizer.create(load_config(CONFIGS / "demo.yaml", VQ).vqgan, seed=0).save(tok)
    overrides = [*VQ, *MICRO, f"prepare.image_tokenizer={tok}", "source.size=24",
                 "demo.heldout_docs=8", "train.steps=1", "train.checkpoint_every=1",
                 "demo.baseline=false"]
    cfg = demo.demo_config(CONFIGS / "demo.yaml", tmp / "demo", overrides)
    demo.run_stages(cfg, DemoDir(tmp / "demo"), log=lambda *_: None)
    return str(DemoDir(tmp / "demo").run.root), cfg


def image_cli(capsys, run, out, *args):
    code, stdout, err = run_cli(capsys, "generate", "image", "--workdir", run, "--prompt",
                                PROMPT, "--num", "1", "--out", str(out), *args)
    assert code == 0, err
    return np.load(out.with_suffix(".npy")), stdout


def test_retrieve_places_the_query_documents_as_training_does(micro_run, tmp_path, capsys,
                                                              monkeypatch):
    run, cfg = micro_run
    seen = []
    real = tasks.decode
    monkeypatch.setattr(tasks, "decode", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    codes, out = image_cli(capsys, run, tmp_path / "r.png", "--retrieve", "2")
    assert "2 retrieved document(s) each" in out
    _, model, toks, _ = tasks.load_model(run)
    vocab = model.vocab
    caption = vocab.text_ids(toks.text.encode(PROMPT))
    (docs,) = Retriever(cfg).documents([PROMPT], [caption], 2)
    assert len(docs) == 2
    # the documents are the bank's, chosen from the text-only query's hits by the offline
    # neighbors' heuristics: distinct, documents with both sides first, best score first
    retriever = Retriever(cfg)
    (ids,) = retriever.choose([PROMPT], [caption], 2)
    hits, scores = retriever.search([PROMPT], [caption], cfg.retrieval.candidates)
    assert len(set(ids.tolist())) == 2 and set(ids.tolist()) <= set(hits[0].tolist())
    rank = {int(i): r for r, i in enumerate(hits[0])}
    assert retriever.pairs[ids].all()  # every shapes document has both sides
    assert rank[int(ids[0])] < rank[int(ids[1])]
    bank = records.open_documents(cfg.data.dir)
    for d, i in zip(docs, ids):
        doc = records.decode_document(bank[int(i)])
        np.testing.assert_array_equal(d, sequences.document(doc["text"], doc["image"], vocab))
    # the conditional prompt is a training example up to where the query's image starts
    image = vocab.image_ids(codes.reshape(-1))
    example, _ = sequences.example(sequences.document(caption, image, vocab), docs, vocab)
    (streams,) = seen
    np.testing.assert_array_equal(streams[0][0], example[:len(example) - image.size - 1])
    np.testing.assert_array_equal(streams[1][0], [vocab.eos, vocab.sentinel(0), vocab.brk])


def test_rerank_dual_keeps_the_candidate_the_encoder_scores_best(micro_run, tmp_path, capsys):
    run, cfg = micro_run
    every, _ = image_cli(capsys, run, tmp_path / "all.png", "--samples", "3")
    best, out = image_cli(capsys, run, tmp_path / "best.png", "--samples", "3",
                          "--rerank", "dual")
    assert "best of 3 by the retrieval dual encoder" in out
    candidates = every.reshape(3, -1)
    # the score recomputed here: unit text query . unit image embedding of each candidate
    _, model, toks, _ = tasks.load_model(run)
    enc = load_encoder(retrieval_dir(cfg).encoder, cfg.retrieval.embed_batch)
    text_ids = model.vocab.text_ids(toks.text.encode(PROMPT))
    q = enc.embed_texts([(text_ids - model.vocab.text_offset + 1).astype(np.int32)])[0]
    ims = enc.embed_images(toks.image.decode(candidates))
    scores = (ims / np.linalg.norm(ims, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    assert len(set(np.round(scores, 6))) == 3  # distinct candidates, distinct scores
    np.testing.assert_array_equal(best.reshape(-1), candidates[int(np.argmax(scores))])
    assert f"mean similarity {scores.max():.4f}" in out


def test_caption_candidates_rank_by_a_plain_forward_pass(micro_run, tmp_path, capsys):
    run, cfg = micro_run
    docs = [records.decode_document(d) for d in records.open_documents(cfg.data.dir)]
    picture = tmp_path / "scene.png"
    Image.fromarray(docs[0]["pixels"]).save(picture)
    texts = [docs[0]["caption"], docs[1]["caption"], "a small blue circle at the top"]
    (tmp_path / "c.txt").write_text("\n".join([texts[0], "", f"  {texts[1]} ", texts[2]]) + "\n")
    code, out, err = run_cli(capsys, "generate", "caption", "--workdir", run, "--image",
                             str(picture), "--candidates", str(tmp_path / "c.txt"))
    assert code == 0, err
    lines = out.strip().splitlines()
    chosen = lines[0].split("\t")[1]
    printed = {t: float(s) for s, t in (line.strip().split("\t") for line in lines[1:])}
    # the same scores another way: eval/score.py's forward pass over each full sequence
    _, model, toks, _ = tasks.load_model(run)
    w = weights.load(run)
    vocab = model.vocab
    image = vocab.image_ids(toks.image.encode(docs[0]["pixels"][None])[0])
    m = vocab.sentinel(0)
    want = {}
    for t in texts:
        caption = vocab.text_ids(toks.text.encode(t))
        prompt = [vocab.eos, m, vocab.brk, *image, vocab.eos, m]
        row = np.asarray([*prompt, *caption, vocab.eoss], np.int32)[None]
        want[t] = float(score_tokens(w, row)[0, len(prompt) - 1:].sum())
    assert set(printed) == set(texts)
    for t in texts:
        assert printed[t] == pytest.approx(want[t], abs=2e-3)
    assert len({round(v, 3) for v in want.values()}) == 3
    assert chosen == max(want, key=want.get)
    assert [line.split("\t")[1] for line in lines[1:]] == sorted(want, key=want.get,
                                                                  reverse=True)


def test_sampled_captions_are_never_empty(micro_run, tmp_path, capsys, monkeypatch):
    """The caption command decodes with a minimum of one piece even at the config's
    min_text_tokens=0 (decode's min_tokens is tested in test_generate.py), and an explicit
    larger minimum stays."""
    run, cfg = micro_run
    picture = str(tmp_path / "scene.png")
    doc = next(records.iter_documents(cfg.data.dir))
    Image.fromarray(doc["pixels"]).save(picture)
    seen = []
    real = tasks.decode
    monkeypatch.setattr(tasks, "decode", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
    for minimum in (0, 3):
        code, out, err = run_cli(capsys, "generate", "caption", "--workdir", run, "--image",
                                 picture, f"generate.min_text_tokens={minimum}")
        assert code == 0, err
        assert out.split("\t")[1].strip()
    assert [d.min_tokens for d in seen] == [tasks.MIN_CAPTION_TOKENS, 3]
    assert tasks.MIN_CAPTION_TOKENS == 1


def test_bad_requests_exit_2_naming_the_problem(micro_run, tmp_path, capsys):
    run, cfg = micro_run
    size = json.loads((retrieval_dir(cfg).index / "manifest.json").read_text())["size"]
    image = ["generate", "image", "--workdir", run, "--prompt", PROMPT, "--num", "1",
             "--out", str(tmp_path / "x.png")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = {
        "no index": ([*image, "--retrieve", "1", f"retrieval.dir={tmp_path / 'none'}"],
                     f"the run has no retrieval index at {tmp_path / 'none' / 'index'}; "
                     "build it with `cm3leon retrieval train-encoder` then `cm3leon index`"),
        "more than the index": ([*image, "--retrieve", str(size + 1)],
                                f"--retrieve {size + 1}: the index at"),
        "past the context": ([*image, "--retrieve", "3"],
                             "image tokens = "),
        "zero": ([*image, "--retrieve", "0"], "--retrieve 0: retrieve at least 1 document"),
        "no encoder": ([*image, "--samples", "2", "--rerank", "dual",
                        f"retrieval.dir={tmp_path / 'none'}"],
                       "--rerank dual: the run has no retrieval encoder at"),
        "clip without dir": ([*image, "--rerank", "clip"], "--rerank clip and --clip DIR"),
        "no candidates file": (["generate", "caption", "--workdir", run, "--image", run,
                                "--candidates", str(tmp_path / "nope.txt")],
                               "nope.txt does not exist"),
        "empty candidates": (["generate", "caption", "--workdir", run, "--image", run,
                              "--candidates", str(empty)], "no captions (one caption a line)"),
    }
    for name, (argv, message) in cases.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (name, err)
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
    code, _, err = run_cli(capsys, *image, "--retrieve", "3")
    assert "> model.max_seq_len=256; retrieve fewer" in err
    assert not (tmp_path / "x.png").exists()


def test_int8_weights_reach_generation_through_the_loader(micro_run, tmp_path, capsys):
    """`generate.weights=int8`: the loaded model holds int8 kernels (dequantized where
    used) and `cm3leon generate` samples from it."""
    from cm3leon_jax.model import quant

    run, _ = micro_run
    _, model, _, _ = tasks.load_model(run, overrides=["generate.weights=int8"])
    leaves = jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, quant.QArray))
    packed = [x for x in leaves if isinstance(x, quant.QArray)]
    assert packed and all(x.values.dtype == np.int8 for x in packed)
    _, float_model, _, _ = tasks.load_model(run)
    assert not any(isinstance(x, quant.QArray) for x in jax.tree.leaves(
        float_model.params, is_leaf=lambda x: isinstance(x, quant.QArray)))
    codes, _ = image_cli(capsys, run, tmp_path / "q.png", "generate.weights=int8")
    assert codes.size and (tmp_path / "q.png").stat().st_size > 0


def test_profile_writes_a_trace_of_the_generation(micro_run, tmp_path, capsys):
    run, _ = micro_run
    image_cli(capsys, run, tmp_path / "p.png", "--profile", str(tmp_path / "trace"))
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))
    code, _, err = run_cli(capsys, "generate", "image", "--workdir", run, "--prompt", PROMPT,
                           "--profile", "gs://bucket/trace")
    assert code == 2 and "--profile gs://bucket/trace: a local directory" in err


def test_image_logprobs_score_the_training_layout_with_and_without_documents(micro_run):
    """tasks.image_logprobs (the demo's image_nll) equals eval/score.py's forward pass over
    the training example `<eos> r1 <break> caption <break> image <eos>`, summed over the
    image's tokens, for rows with 0, 1 and 2 documents scored in one padded batch."""
    run, cfg = micro_run
    docs = [records.decode_document(d) for d in records.open_documents(cfg.data.dir)]
    _, model, _, _ = tasks.load_model(run)
    w = weights.load(run)
    vocab = model.vocab
    as_doc = lambda d: sequences.document(d["text"], d["image"], vocab)
    queries = docs[:3]
    retrieved = [[], [as_doc(docs[5])], [as_doc(docs[6]), as_doc(docs[7])]]
    got = tasks.image_logprobs(model, [d["text"] for d in queries],
                               [vocab.to_codes(d["image"]) for d in queries], retrieved)
    for q, r, value in zip(queries, retrieved, got):
        tokens, _ = sequences.example(as_doc(q), r, vocab)
        n = q["image"].size  # the image ends the example, before its closing <eos>
        want = float(score_tokens(w, tokens[None])[0, -n - 1:-1].sum())
        assert value == pytest.approx(want, abs=2e-3)
    assert len({round(float(v), 3) for v in got}) == 3
    with pytest.raises(ValueError, match="3 captions, 3 images and 2 retrieved lists"):
        tasks.image_logprobs(model, [d["text"] for d in queries],
                             [vocab.to_codes(d["image"]) for d in queries], retrieved[:2])
