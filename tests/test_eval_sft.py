"""`cm3leon eval-sft`: prompts are the SFT training documents cut at the answer, chance and
the scores are what they say, and the command runs end to end on real runs.

Tokenizers are real: a sentencepiece model trained on the suite's texts and a randomly
initialised VQ-GAN (4x4 codes per 32 px image).
"""

import collections
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.cli import main as cli
from cm3leon_jax.config import load_config, save_config
from cm3leon_jax.data import cm3
from cm3leon_jax.layout import DataDir
from cm3leon_jax.sft.evaluate import chance, eval_examples, metrics, truth
from cm3leon_jax.sft.prompts import answer_text, instruction_prefix, task_prompt
from cm3leon_jax.sft.shapes_suite import ShapesSFT
from cm3leon_jax.config.sft import SHAPES_TASKS
from cm3leon_jax.sft.tasks import tokenize_example
from cm3leon_jax.shapes.scores import score_caption, score_vqa
from conftest import CONFIGS
from test_export import write_run
from test_sft_train import SHAPE, toks  # noqa: F401 (fixture)

N = 12  # examples per task: every phrasing of every task appears


@pytest.fixture(scope="module")
def tokenizers(toks):  # noqa: F811
    from cm3leon_jax.tokenizers.image import ImageTokenizer
    from cm3leon_jax.tokenizers.text import TextTokenizer

    vocab = load_config(CONFIGS / "tiny.yaml").vocab.build()
    return (TextTokenizer.load(DataDir(toks).text_tokenizer),
            ImageTokenizer.load(DataDir(toks).image_tokenizer), vocab)


def _document(example, text, image, vocab):
    """The SFT training document `<eos> example <eos>` and the positions of its `<break>`s."""
    doc = np.concatenate([[vocab.eos], tokenize_example(example, text.encode, image.encode,
                                                        vocab), [vocab.eos]]).astype(np.int32)
    return doc, np.flatnonzero(doc == vocab.brk)


@pytest.mark.parametrize("task", SHAPES_TASKS)
def test_prompts_are_training_documents_cut_at_the_answer(tokenizers, task):
    text, image, vocab = tokenizers
    suite = ShapesSFT(seed=0, resolution=32, max_objects=3)
    for i in range(N):
        e = suite.example(task, "eval", i)
        doc, brk = _document(e, text, image, vocab)
        asked = task_prompt(e, text.encode, image.encode, vocab)
        if task in ("caption", "vqa"):
            # CM3 with the text segment as one span: the prompt runs to the instruction's
            # end inside the moved span, and what follows is the answer, then <eoss>.
            head = len(vocab.text_ids(text.encode(instruction_prefix(e))))
            masked, _ = cm3.apply_spans(doc, [(1, brk[0])], vocab)
            cut = np.flatnonzero(masked == vocab.sentinel(0))[1] + 1 + head
            assert asked.kind == "text" and len(asked.streams) == 1
            np.testing.assert_array_equal(asked.streams[0], masked[:cut])
            answer = masked[cut:-1]
            assert masked[-1] == vocab.eoss
            assert text.decode(vocab.to_piece_ids(answer)).strip() == answer_text(e)
            assert e.segments[0].endswith(answer_text(e))
        elif task == "grounding":
            cond, uncond = asked.streams
            np.testing.assert_array_equal(cond, doc[:brk[0] + 1])
            masked, _ = cm3.apply_spans(doc, [(1, brk[0])], vocab)
            np.testing.assert_array_equal(uncond, masked[:3])
        else:  # instruction <break> condition <break> text <break> target
            full, uncond, image_only = asked.streams
            np.testing.assert_array_equal(full, doc[:brk[2] + 1])
            text_span, cond_span = (brk[1] + 1, brk[2]), (brk[0] + 1, brk[1])
            masked, _ = cm3.apply_spans(doc, [text_span], vocab)
            np.testing.assert_array_equal(image_only, masked[:brk[1] + 3])
            masked, _ = cm3.apply_spans(doc, [cond_span, text_span], vocab)
            np.testing.assert_array_equal(uncond, masked[:brk[0] + 5])
        assert asked.kind == ("text" if task in ("caption", "vqa") else "image")


def test_chance_is_the_others_answers_hit_rate():
    """With one object per scene a caption is right iff all four attributes match and a VQA
    answer iff it equals the truth: chance counts the matching others by hand."""
    suite = ShapesSFT(seed=3, resolution=32, max_objects=1)
    captions = [suite.example("caption", "eval", i) for i in range(40)]
    keys = [tuple(e.meta["objects"][0][k] for k in ("size", "colour", "shape", "position"))
            for e in captions]
    count = collections.Counter(keys)
    want = np.mean([(count[k] - 1) / (len(keys) - 1) for k in keys])
    assert chance(captions) == pytest.approx(want, abs=1e-12)
    colour_shape = collections.Counter(k[1:3] for k in keys)  # the demo's caption score
    want = np.mean([(colour_shape[k[1:3]] - 1) / (len(keys) - 1) for k in keys])
    assert chance(captions, metric=1) == pytest.approx(want, abs=1e-12)
    assert all(score_caption(e.meta, truth(e)) == 1.0 for e in captions)

    vqa = [suite.example("vqa", "eval", i) for i in range(60)]
    kinds = collections.Counter(e.meta["kind"] for e in vqa)
    pairs = collections.Counter((e.meta["kind"], e.meta["answer"]) for e in vqa)
    want = np.mean([(pairs[e.meta["kind"], e.meta["answer"]] - 1) / (kinds[e.meta["kind"]] - 1)
                    for e in vqa])
    assert chance(vqa) == pytest.approx(want, abs=1e-12)
    assert all(score_vqa(e.meta, truth(e)) == 1.0 for e in vqa)


@pytest.mark.slow
def test_eval_sft_end_to_end(toks, tmp_path, capsys):  # noqa: F811
    cfg = load_config(CONFIGS / "tiny.yaml", [*SHAPE, f"sft.tokenizers={toks}"])
    a = write_run(cfg, tmp_path / "a")
    save_config(cfg, a / "config.yaml")
    b = tmp_path / "b"
    shutil.copytree(a, b)  # the same weights under another name: identical answers
    out = tmp_path / "out"
    args = ["eval-sft", "--config", str(CONFIGS / "tiny.yaml"), "--workdir", str(a),
            "--workdir", str(b), "--out", str(out), "sft.eval_examples=3", "sft.max_objects=1"]
    assert cli(args) == 0
    result = json.loads((out / "eval_sft.json").read_text())
    ra, rb = result["runs"][str(a)], result["runs"][str(b)]
    rows = ["caption", "caption colour+shape", "vqa", "edit", "grounding", "control"]
    assert ra == rb and ra["step"] == 3 and list(ra["scores"]) == rows
    assert all(0.0 <= v <= 1.0 for v in ra["scores"].values())
    examples = eval_examples(load_config(CONFIGS / "tiny.yaml", ["sft.eval_examples=3",
                                                                 "sft.max_objects=1"]), 32)
    for task, scorer in (("caption", score_caption), ("vqa", score_vqa)):
        samples = result["samples"][task]
        assert [s["truth"] for s in samples] == [truth(e) for e in examples[task]]
        assert ra["scores"][task] == pytest.approx(np.mean(
            [scorer(e.meta, s[str(a)]) for e, s in zip(examples[task], samples)]))
    assert result["chance"] == {n: pytest.approx(chance(examples[t], m))
                                for n, t, m in metrics(examples)}
    assert result["ceiling"]["caption"] == result["ceiling"]["vqa"] == 1.0
    table = (out / "eval_sft.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and table[0].endswith("| chance | ceiling |")
    grid = np.asarray(Image.open(out / "eval_sft.png"))
    assert grid.shape == (9 * 34 + 2, 4 * 34 + 2, 3)  # 3 image tasks x 3 rows; cond, truth, a, b

    assert cli([*args[:4], str(tmp_path), "--out", str(out)]) == 2
    assert "is neither a run directory (no checkpoints/)" in capsys.readouterr().err
