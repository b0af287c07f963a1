"""SFT data: template token layouts, the shapes suite's ground truth, the mixture, JSONL errors."""

import json
import re
from fractions import Fraction

import numpy as np
import pytest

from cm3leon_jax.config import ConfigError, VQGANConfig, load_config
from cm3leon_jax.config.sft import SHAPES_TASKS
from cm3leon_jax.sft.jsonl import SFTDataError, jsonl_example, read_sft_jsonl
from cm3leon_jax.sft.mixture import config_shares, mixture_draw, mixture_report, mixture_weights
from cm3leon_jax.sft.rows import framed_example, pack_row
from cm3leon_jax.sft.shapes_suite import ShapesSFT
from cm3leon_jax.sft.tasks import PHRASINGS, TASKS, format_example, tokenize_example
from cm3leon_jax.shapes.edits import SEGMENT_COLOURS, edge_map, plural, reference
from cm3leon_jax.shapes.world import COLOURS, POSITIONS, SHAPES, render_shapes, shape_mask
from cm3leon_jax.vocab import Vocab

RES = 32
TINY_VQ = VQGANConfig(resolution=RES, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      mid_attn=False, norm_groups=4, z_channels=8, embed_dim=8, codebook_size=64)


@pytest.fixture(scope="module")
def tokenizers():
    from cm3leon_jax.tokenizers.image import ImageTokenizer
    from cm3leon_jax.tokenizers.text import train_text_tokenizer

    suite = ShapesSFT(seed=0, resolution=RES)
    texts = [s for t in SHAPES_TASKS for i in range(10)
             for s in suite.example(t, "train", i).segments if isinstance(s, str)]
    text = train_text_tokenizer(texts, 320)
    image = ImageTokenizer.create(TINY_VQ, seed=0, batch_size=4)
    return text, image, Vocab(320, TINY_VQ.codebook_size, 8)


def _one_object_scene():
    o = {"shape": "circle", "colour": "red", "rgb": list(COLOURS["red"]), "size": "small",
         "position": "center", "cell": [1, 1], "center": [16.0, 16.0], "half": 5.0}
    image, boxes = render_shapes([o], RES)
    return o, image, boxes[0]


def test_template_token_layout_pinned(tokenizers):
    text, image_tok, vocab = tokenizers
    o, image, box = _one_object_scene()
    assert box == [11, 11, 21, 21]
    cond = edge_map(image)
    cases = {
        "caption": ({"caption": "one shape: a small red circle at the center", "image": image},
                    ["Describe the given picture. one shape: a small red circle at the center",
                     image]),
        "vqa": ({"question": "What colour is the circle?", "answer": "red", "image": image},
                ["Question: What colour is the circle? Answer: red.", image]),
        "grounding": ({"caption": "one shape: a small red circle",
                       "objects": [("red circle", box)], "image": image},
                      ["Generate high quality image of one shape: a small red circle with "
                       "segmentations red circle at (11, 11) -> (21, 21).", image]),
        "edit": ({"edit": "make the circle blue", "image": image, "target": cond},
                 ["Edit the image following the text instruction.", image,
                  "make the circle blue", cond]),
        "control": ({"condition": "edge", "condition_image": cond, "caption": "a red circle",
                     "image": image},
                    ["Generate high quality image following the edge map.", cond,
                     "a red circle", image]),
    }
    t = image_tok.tokens_per_image
    for task, (fields, want) in cases.items():
        ex = format_example(task, fields, 0, task)
        assert len(ex.segments) == len(want)
        ids = tokenize_example(ex, text.encode, image_tok.encode, vocab)
        assert ids.dtype == np.int32
        # Layout: seg <break> seg ...; text spans decode to the exact template text, image
        # spans are exactly the tokenizer's codes for the exact image, shifted into range.
        spans = np.split(ids, np.flatnonzero(ids == vocab.brk))
        assert len(spans) == len(want)
        for k, (span, seg) in enumerate(zip(spans, want)):
            body = span[1:] if k else span
            if isinstance(seg, str):
                assert vocab.is_text(body).all()
                assert text.decode(vocab.to_piece_ids(body)) == seg
                assert ex.segments[k] == seg
            else:
                assert len(body) == t
                np.testing.assert_array_equal(
                    body, vocab.image_ids(image_tok.encode(seg[None])[0]))
        assert (ids == vocab.brk).sum() == len(want) - 1
        assert len(ids) == sum(len(text.encode(s)) if isinstance(s, str) else t
                               for s in want) + len(want) - 1


def test_every_phrasing_keeps_its_fields():
    o, image, box = _one_object_scene()
    fields = {"caption": "CAP", "question": "Q?", "answer": "ANS", "image": image,
              "objects": [("red circle", box)], "edit": "EDIT", "target": image,
              "condition": "edge", "condition_image": image, "text": "TXT",
              "choices": ["north", "south"], "answer_index": 1}
    for task in TASKS:
        texts = set()
        for p in range(len(PHRASINGS[task])):
            ex = format_example(task, {**fields, "answer": fields["answer_index"]}
                                if task == "scienceqa" else fields, p, "x")
            text = " ".join(s for s in ex.segments if isinstance(s, str))
            texts.add(text)
            need = {"caption": ["CAP"], "vqa": ["Q?", "ANS"], "edit": ["EDIT"],
                    "grounding": ["CAP", "red circle at (11, 11) -> (21, 21)"],
                    "control": ["CAP", "edge"], "ocr": ['"TXT"'],
                    "scienceqa": ["Q?", "(A) north (B) south", "(B) south."]}[task]
            assert all(n in text for n in need), (task, p, text)
        assert len(texts) == len(PHRASINGS[task]) >= 3


def _examples(task, n, split="train", seed=0):
    suite = ShapesSFT(seed=seed, resolution=RES)
    return [suite.example(task, split, i) for i in range(n)]


def test_edit_pairs_differ_exactly_in_the_asked_attribute():
    kinds = set()
    for ex in _examples("edit", 120):
        before, after, i = ex.meta["objects"], ex.meta["after"], ex.meta["object"]
        src, tgt = ex.segments[1], ex.segments[3]
        edit = ex.segments[2]
        kinds.add(ex.meta["kind"])
        # The edit text names object i and no other.
        ref = re.match(r"(?:make|move) (the .+?) (\w+)$", edit).group(1)
        assert ref == reference(before, i)
        assert [reference(before, j) for j in range(len(before))].count(ref) == 1
        changed = {"recolour": {"colour", "rgb"},
                   "move": {"cell", "position", "center", "bbox"}}[ex.meta["kind"]]
        for j, (b, a) in enumerate(zip(before, after)):
            diff = {k for k in b if b[k] != a[k]}
            assert diff == (changed if j == i else set()) or (
                j == i and ex.meta["kind"] == "move" and diff == changed - {"bbox"})
        old = shape_mask(before[i]["shape"], *before[i]["center"], before[i]["half"], RES)
        new = shape_mask(after[i]["shape"], *after[i]["center"], after[i]["half"], RES)
        differ = (src != tgt).any(-1)
        if ex.meta["kind"] == "recolour":
            assert edit.endswith(ex.meta["colour"]) and after[i]["colour"] == ex.meta["colour"]
            assert after[i]["colour"] != before[i]["colour"]
            np.testing.assert_array_equal(differ, old)
            assert (tgt[old] == COLOURS[ex.meta["colour"]]).all()
        else:
            d = ex.meta["direction"]
            dr, dc = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[d]
            assert after[i]["cell"] == [before[i]["cell"][0] + dr, before[i]["cell"][1] + dc]
            np.testing.assert_array_equal(differ, old ^ new if (old & new).any() else old | new)
            assert (tgt[new] == before[i]["rgb"]).all()
            step = round(RES / 3)  # the same pixels, translated by whole pixels
            np.testing.assert_array_equal(np.roll(old, (dr * step, dc * step), (0, 1)), new)
    assert kinds == {"recolour", "move"}


def test_vqa_answers_are_exact_from_pixels():
    kinds = set()
    for ex in _examples("vqa", 150):
        objs, image, q, a = ex.meta["objects"], ex.segments[1], ex.meta["question"], ex.meta["answer"]
        kinds.add(ex.meta["kind"])
        assert f"{q} Answer: {a}." in ex.segments[0] or f"{q} A: {a}." in ex.segments[0] \
            or f"{q} {a}." in ex.segments[0]
        if ex.meta["kind"] == "colour":
            ref = q[len("What colour is "):-1]
            assert a not in ref  # the question does not name its answer
            (o,) = [o for j, o in enumerate(objs) if reference(objs, j, coloured=False) == ref]
            x, y = (int(v) for v in o["center"])
            assert tuple(image[y, x]) == COLOURS[a]
        elif ex.meta["kind"] == "position":
            ref = q[len("Where is "):-1]
            assert a not in ref
            (o,) = [o for j, o in enumerate(objs) if reference(objs, j, False) == ref]
            x0, y0, x1, y1 = o["bbox"]
            row, col = int((y0 + y1) / 2 // (RES / 3)), int((x0 + x1) / 2 // (RES / 3))
            assert a == POSITIONS[row][col]
        else:
            m = re.match(r"How many (?:shapes|(\w+) shapes|(\w+)) are there\?", q)
            colour = m.group(1)
            shape = m.group(2) and {plural(s): s for s in SHAPES}[m.group(2)]  # "crosses"
            if colour is None and shape is None:
                n = len(objs)
            elif colour:  # count the objects of that colour in the pixels
                n = sum(tuple(image[int(o["center"][1]), int(o["center"][0])]) == COLOURS[colour]
                        for o in objs)
            else:
                n = sum(o["shape"] == shape for o in objs)
            assert a == ("zero one two three four five six seven eight nine".split())[n]
    assert kinds == {"colour", "count", "position"}


def test_grounding_boxes_hold_their_objects_and_control_maps_match():
    for ex in _examples("grounding", 40):
        boxes = [tuple(map(int, b)) for b in
                 re.findall(r"\((\d+), (\d+)\) -> \((\d+), (\d+)\)", ex.segments[0])]
        objs, image = ex.meta["objects"], ex.segments[1]
        assert len(boxes) == len(objs)
        for o, (x1, y1, x2, y2) in zip(objs, boxes):
            mask = shape_mask(o["shape"], *o["center"], o["half"], RES)
            ys, xs = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert (image[mask] == o["rgb"]).all()
    conds = set()
    for ex in _examples("control", 40):
        cond, image = ex.segments[1], ex.segments[3]
        conds.add(ex.meta["condition"])
        if ex.meta["condition"] == "edge":
            right = (image[:, :-1] != image[:, 1:]).any(-1)
            assert ((cond[:, :-1, 0] == 0) >= right).all()
            assert set(np.unique(cond)) <= {0, 255}
        else:
            for o in ex.meta["objects"]:
                mask = shape_mask(o["shape"], *o["center"], o["half"], RES)
                assert (cond[mask] == SEGMENT_COLOURS[o["shape"]]).all()
            assert (cond[(image == image[0, 0]).all(-1)] == 0).all()  # background stays black
    assert conds == {"edge", "segmentation"}


def test_suite_is_deterministic_with_disjoint_splits():
    for task in SHAPES_TASKS:
        a, b = _examples(task, 5), _examples(task, 5)
        for x, y in zip(a, b):
            assert x.id == y.id and x.meta == y.meta
            for s, t in zip(x.segments, y.segments):
                assert s == t if isinstance(s, str) else np.array_equal(s, t)
        other = _examples(task, 5, seed=1)
        assert [x.meta["objects"] for x in a] != [x.meta["objects"] for x in other]
    suite = ShapesSFT(seed=0, resolution=RES)
    train = {json.dumps(suite.scene("caption", "train", i)) for i in range(200)}
    held = {json.dumps(suite.scene("caption", "eval", i)) for i in range(200)}
    assert not train & held
    with pytest.raises(ValueError, match="unknown split"):
        suite.example("caption", "test", 0)


def test_mixture_weights_match_hand_computation():
    shares = mixture_weights({"caption": 1000, "vqa": 10000, "edit": 100})
    # natural 10/111, 100/111, 1/111; target 1/3 each -> ratios 3.7, 0.37, 37 -> clip 3, 0.37, 3
    # -> masses 3000, 3700, 300 (/11100) -> 3/7, 37/70, 3/70
    want = [Fraction(3, 7), Fraction(37, 70), Fraction(3, 70)]
    assert [s.ratio for s in shares] == pytest.approx([3.0, 0.37, 3.0])
    assert [s.weight for s in shares] == pytest.approx([float(w) for w in want], abs=1e-12)
    # Inside the bounds the targets are met exactly.
    shares = mixture_weights({"a": 100, "b": 300}, {"a": 1.0, "b": 1.0})
    assert [s.weight for s in shares] == pytest.approx([0.5, 0.5])
    # A zero target drops the task.
    shares = mixture_weights({"a": 100, "b": 300}, {"a": 0.0, "b": 2.0})
    assert [s.weight for s in shares] == pytest.approx([0.0, 1.0])
    # Draws: deterministic, the right index range, frequencies near the weights.
    shares = mixture_weights({"caption": 1000, "vqa": 10000, "edit": 100})
    draws = [mixture_draw(shares, 7, k) for k in range(6000)]
    assert draws[:50] == [mixture_draw(shares, 7, k) for k in range(50)]
    sizes = {s.task: s.size for s in shares}
    assert all(0 <= i < sizes[t] for t, i in draws)
    for s in shares:
        assert abs(sum(t == s.task for t, _ in draws) / 6000 - s.weight) < 0.02
    report = mixture_report(shares, 7, 200)
    assert report.splitlines()[2].split()[:6] == ["vqa", "10000", "90.09%", "33.33%", "0.37",
                                                  "52.86%"]
    with pytest.raises(ValueError, match="size 0"):
        mixture_weights({"a": 0})


def test_sft_config_checked(tiny, tmp_path):
    cfg = tiny("sft.sizes=[1000, 10000, 100]", "sft.tasks=[caption, vqa, edit]")
    assert [round(s.weight, 6) for s in config_shares(cfg.sft)] == [
        round(3 / 7, 6), round(37 / 70, 6), round(3 / 70, 6)]
    for bad, msg in [("sft.tasks=[caption, ocrr]", "'ocrr' is not one of"),
                     ("sft.tasks=[caption, ocr]", "['ocr'] come from JSONL files only"),
                     ("sft.sizes=[1, 2]", "sft.sizes has 2 entries"),
                     ("sft.weights=[1, 1]", "sft.weights has 2 entries"),
                     ("sft.min_ratio=0", "sft.min_ratio=0"),
                     ("sft.max_ratio=0.5", "sft.max_ratio=0.5"),
                     ("sft.tasks=[vqa, vqa]", "twice"),
                     ("sft.source=jsonl", "sft.files")]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            tiny(bad) if "tasks=[vqa" not in bad else tiny(bad, "sft.sizes=[1, 2]")
    f = tmp_path / "a.jsonl"
    f.write_text('{"task": "vqa", "image": "x.png", "question": "q?", "answer": "a"}\n' * 3
                 + '{"task": "caption", "image": "x.png", "caption": "c"}\n')
    cfg = tiny("sft.source=jsonl", f"sft.files=[{f}]", "sft.tasks=[caption, vqa]")
    assert [(s.task, s.size) for s in config_shares(cfg.sft)] == [("caption", 1), ("vqa", 3)]
    cfg = tiny("sft.source=jsonl", f"sft.files=[{f}]", "sft.tasks=[caption]")
    with pytest.raises(ValueError, match=re.escape(f"{f}:1: task 'vqa' is not in sft.tasks")):
        config_shares(cfg.sft)


def _write_png(path, w, h):
    from PIL import Image

    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)


def test_jsonl_records_and_bad_record_errors(tmp_path):
    _write_png(tmp_path / "a.png", 64, 48)
    _write_png(tmp_path / "b.png", 64, 48)
    good = [
        {"task": "caption", "image": "a.png", "caption": "a grey square"},
        {"task": "vqa", "image": "a.png", "question": "What colour?", "answer": "grey"},
        {"task": "edit", "image": "a.png", "edit": "make it blue", "target": "b.png"},
        {"task": "grounding", "image": "a.png", "caption": "a dog",
         "objects": [{"label": "dog", "box": [8, 0, 56, 48]}]},
        {"task": "control", "image": "a.png", "condition_image": "b.png",
         "condition": "canny edge", "caption": "a grey square"},
        {"task": "ocr", "image": "a.png", "text": "STOP"},
        {"task": "scienceqa", "image": "b.png", "question": "Which way does it point?",
         "choices": ["north", "south", "east"], "answer": 2},
        {"task": "ocr", "image": "a.png", "text": "fin", "prompt": "Chalk: {text} {{done}}"},
        {"task": "scienceqa", "image": "b.png", "question": "Hot?", "choices": ["yes", "no"],
         "answer": 0, "prompt": "Lecture first. {question} {choices} => {answer}"},
        {"task": "edit", "image": "a.png", "edit": "make it blue", "target": "b.png",
         "prompt": "Edit {{carefully}}."},
    ]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    records = read_sft_jsonl(f)
    assert [r["task"] for r in records] == [r["task"] for r in good]
    exs = [jsonl_example(r, 32, 0) for r in records]
    assert exs[0].segments[0] == "Describe the given picture. a grey square"
    assert [s.shape for s in exs[2].segments[1::2]] == [(32, 32, 3)] * 2
    # 64x48 -> 43x32, centre crop drops 5 columns: x 8 -> 8*43/64 - 5 = 0.375, 56 -> 32.6
    # (clipped to 32); y 0 -> 0, 48 -> 32
    assert exs[3].segments[0].endswith("dog at (0, 0) -> (32, 32).")
    f2 = tmp_path / "g.jsonl"
    f2.write_text(json.dumps({**good[3], "objects": [{"label": "cat", "box": [20, 6, 40, 30]}]}))
    # x 20 -> 13.4375 - 5 = 8.44 -> 8, 40 -> 26.875 - 5 = 21.9 -> 22; y 6 -> 4, 30 -> 20
    from PIL import Image

    pixels = np.full((48, 64, 3), 200, np.uint8)
    pixels[6:30, 20:40] = (255, 0, 0)  # the box's object, to see where the resize puts it
    Image.fromarray(pixels).save(tmp_path / "a.png")
    ex = jsonl_example(read_sft_jsonl(f2)[0], 32, 0)
    assert ex.segments[0].endswith("cat at (8, 4) -> (22, 20).")
    ys, xs = np.nonzero((ex.segments[1][..., 0] > 230) & (ex.segments[1][..., 1] < 100))
    assert abs(xs.min() - 8) <= 1 and abs(xs.max() + 1 - 22) <= 1
    assert abs(ys.min() - 4) <= 1 and abs(ys.max() + 1 - 20) <= 1
    assert exs[4].segments[2] == "a grey square" and "canny edge map" in exs[4].segments[0]
    assert exs[5].segments[0] == 'Write "STOP".' and exs[5].segments[1].shape == (32, 32, 3)
    assert exs[6].segments[0] == ("Question: Which way does it point? Options: (A) north "
                                  "(B) south (C) east Answer: (C) east.")
    assert exs[6].meta["prefix"] == ("Question: Which way does it point? Options: (A) north "
                                     "(B) south (C) east Answer: ")
    # a record's own prompt replaces the phrasings (whatever the draw's phrasing)
    own = [jsonl_example(records[7], 32, p).segments[0] for p in range(3)]
    assert own == ["Chalk: fin {done}"] * 3
    assert exs[8].segments[0] == "Lecture first. Hot? (A) yes (B) no => (A) yes"
    assert exs[8].meta["prefix"] == "Lecture first. Hot? (A) yes (B) no => "
    assert exs[9].segments[0] == "Edit {carefully}."

    bad_lines = [
        ("{not json", "not JSON"),
        ('{"task": "ocrr", "image": "a.png"}', "key 'task' is 'ocrr'"),
        ('{"task": "ocr", "image": "a.png"}', "task 'ocr' needs key 'text'"),
        ('{"task": "scienceqa", "image": "a.png", "question": "q", "choices": ["a"], '
         '"answer": 0}', "key 'choices' must be a list of 2 to 26"),
        ('{"task": "scienceqa", "image": "a.png", "question": "q", "choices": ["a", "b"], '
         '"answer": 2}', "key 'answer' must be the index of the right choice, an integer in "
         "[0, 2), got 2"),
        ('{"task": "ocr", "image": "a.png", "text": "t", "prompt": "Write it."}',
         "key 'prompt' of task 'ocr' must use {text}, got [] in 'Write it.'"),
        ('{"task": "vqa", "image": "a.png", "question": "q", "answer": "a", '
         '"prompt": "{question} {answer} {image}"}', "must use {answer} {question}"),
        ('{"task": "ocr", "image": "a.png", "text": "t", "prompt": "Write {text"}',
         "key 'prompt' is not a template"),
        ('{"task": "vqa", "image": "a.png", "question": "q", "answer": "a", '
         '"prompt": "{answer} answers {question}"}', "must end with {answer} (punctuation"),
        ('{"task": "vqa", "image": "a.png", "question": "q"}', "needs key 'answer'"),
        ('{"task": "caption", "image": "a.png", "caption": " "}', "key 'caption' must be"),
        ('{"task": "grounding", "image": "a.png", "caption": "c", "objects": '
         '[{"label": "x", "box": [5, 5, 2, 9]}]}', "objects[0].box=[5, 5, 2, 9] needs"),
        ('{"task": "grounding", "image": "a.png", "caption": "c", "objects": '
         '[{"label": "x", "box": [1, 2]}]}', "objects[0].box must be 4 numbers"),
        ("[1, 2]", "expected a JSON object"),
    ]
    for text, msg in bad_lines:
        f.write_text(json.dumps(good[0]) + "\n\n" + text + "\n")
        with pytest.raises(SFTDataError, match=re.escape(f"{f}:3: ") + ".*" + re.escape(msg)):
            read_sft_jsonl(f)
    # Errors only found with the image in hand still name the file, line and key.
    f.write_text(json.dumps({**good[2], "target": "missing.png"}) + "\n")
    with pytest.raises(SFTDataError, match=re.escape(f"{f}:1: key 'target': missing_file")):
        jsonl_example(read_sft_jsonl(f)[0], 32, 0)
    f.write_text(json.dumps({**good[3], "objects": [{"label": "x", "box": [0, 0, 65, 10]}]}))
    with pytest.raises(SFTDataError, match=re.escape(f"{f}:1: objects[0].box=[0, 0, 65, 10] "
                                                     "lies outside the 64x48 image")):
        jsonl_example(read_sft_jsonl(f)[0], 32, 0)
    with pytest.raises(SFTDataError, match="does not exist"):
        read_sft_jsonl(tmp_path / "nope.jsonl")


def test_sft_rows_pinned_with_and_without_prompt_masking():
    v = Vocab(10, 10, 2)  # ids: specials 0-4, sentinels 5-6, text 7-16, image 17-26
    brk, eos = v.brk, v.eos
    a = np.asarray([7, 8, brk, 17, 18], np.int32)  # "text <break> image"
    b = np.asarray([9, brk, 19, brk, 10, brk, 20], np.int32)  # edit-like: 4 segments
    plain = load_config(None, ["data.cm3_lambda=0"]).data  # the CM3 objective without spans
    row = pack_row([framed_example(x, v, "cm3", plain, np.random.default_rng(0)) for x in (a, b)],
                   16, v)
    want_tokens = [eos, 7, 8, brk, 17, 18, eos, eos, 9, brk, 19, brk, 10, brk, 20, eos, 0]
    np.testing.assert_array_equal(row["inputs"], want_tokens[:-1])
    np.testing.assert_array_equal(row["targets"], want_tokens[1:])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 7 + [2] * 9)
    np.testing.assert_array_equal(row["positions"], list(range(7)) + list(range(9)))
    # all: every next token inside the same example (not across the two, not the padding)
    np.testing.assert_array_equal(row["weights"], [1] * 6 + [0] + [1] * 8 + [0])
    masked = pack_row([framed_example(x, v, "response", plain, None) for x in (a, b)], 16, v)
    # response: targets after the last <break> (18 after 17, ...) and the closing <eos>
    want = np.zeros(16)
    want[[3, 4, 5]] = 1  # targets 17, 18, eos of example a
    want[[13, 14]] = 1  # targets 20, eos of example b
    np.testing.assert_array_equal(masked["weights"], want)
    for k in ("inputs", "targets", "positions", "segment_ids"):
        np.testing.assert_array_equal(masked[k], row[k])
    with pytest.raises(ValueError, match="examples of 16 framed tokens do not fit a row of 11"):
        pack_row([framed_example(x, v, "response", plain, None) for x in (a, b)], 10, v)


def test_sft_data_cli_reports_shares_and_writes_samples(tmp_path, capsys):
    from PIL import Image

    from cm3leon_jax.cli import main

    config = str(__import__("pathlib").Path(__file__).parents[1] / "configs" / "tiny.yaml")
    assert main(["sft-data", "--config", config, "--out", str(tmp_path), "--per-task", "2",
                 "--draws", "500", "sft.sizes=[1000, 10000, 100, 1000, 1000]"]) == 0
    out = capsys.readouterr().out.splitlines()
    # natural 10000/13100; masses (x13100): 0.2 x 13100 = 2620 for the three unclipped
    # tasks, 10000 x 0.3 = 3000 (vqa), 100 x 3 = 300 (edit): vqa 3000 / 11160 = 26.88%
    assert out[2].split()[:6] == ["vqa", "10000", "76.34%", "20.00%", "0.30", "26.88%"]
    assert out[3].split()[:6] == ["edit", "100", "0.76%", "20.00%", "3.00", "2.69%"]
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["task"] for x in lines] == [t for t in SHAPES_TASKS for _ in range(2)]
    with Image.open(tmp_path / "edit.png") as im:  # 2 rows of 2 padded 32 px images
        assert im.size == (2 * 36, 2 * 36)
    assert main(["sft-data", "--config", config, "--out", str(tmp_path), "sft.tasks=[ocr]"]) == 2


def test_sft_source_draws_tokenize_and_pack_end_to_end(tiny, tokenizers):
    from cm3leon_jax.sft.source import SFTSource

    text, image_tok, vocab = tokenizers
    cfg = tiny(f"sft.resolution={RES}")
    src = SFTSource(cfg.sft, RES)
    suite = ShapesSFT(cfg.sft.seed, RES, cfg.sft.max_objects)
    draws = [mixture_draw(src.shares, cfg.sft.seed, k) for k in range(8)]
    for k, (task, index) in enumerate(draws):
        assert src[k].id == suite.example(task, "train", index).id
    ids = [src.tokens(k, text, image_tok, vocab) for k in range(8)]
    rows, row = [], []
    for framed in (framed_example(x, vocab, "response", cfg.data, None) for x in ids):
        if sum(len(t) for t, _ in row) + len(framed[0]) > 2049:
            rows.append(pack_row(row, 2048, vocab))
            row = []
        row.append(framed)
    rows.append(pack_row(row, 2048, vocab))
    flat = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in rows])
    want = np.concatenate([np.concatenate([[vocab.eos], x, [vocab.eos]]) for x in ids])
    # every example appears whole, in draw order, framed by <eos> (no row here is full to
    # its last token, so every closing <eos> is also an input)
    np.testing.assert_array_equal(flat, want)
    for k in range(8):
        texts = [s for s in src[k].segments if isinstance(s, str)]
        pieces = np.split(ids[k], np.flatnonzero(ids[k] == vocab.brk))
        decoded = [text.decode(vocab.to_piece_ids(p[p != vocab.brk])) for p in pieces
                   if vocab.is_text(p[p != vocab.brk]).all()]
        assert decoded == texts


def test_scores_are_perfect_on_ground_truth_and_fail_on_wrong_outputs():
    from cm3leon_jax.shapes import scores as sc

    blank = np.empty((RES, RES, 3), np.uint8)
    blank[:] = (235, 235, 235)
    for ex in _examples("vqa", 30):
        assert sc.score_vqa(ex.meta, ex.meta["answer"].upper() + ".") == 1.0
        assert sc.score_vqa(ex.meta, "purple") == 0.0
    caps = _examples("caption", 30)
    for k, ex in enumerate(caps):
        objs = ex.meta["objects"]
        assert sc.score_caption(ex.meta, ex.meta["caption"]) == 1.0
        assert sc.score_scene(objs, ex.segments[1]) == 1.0
        assert sc.score_scene(objs, blank) == 0.0
        other = caps[(k + 1) % len(caps)].segments[1]
        assert sc.score_scene(objs, other) == float(
            sc.true_scene(objs) == sc.true_scene(caps[(k + 1) % len(caps)].meta["objects"]))
        first = "a {size} {colour} {shape} at the {position}".format(**objs[0])
        assert sc.score_caption(ex.meta, first) == 1 / len(objs)
        wrong = "a {size} {colour} {shape} at the {position}".format(
            **{**objs[0], "colour": "purple"})
        assert sc.score_caption(ex.meta, first + " and " + wrong) == 0.0
    for ex in _examples("edit", 30):
        assert sc.score_edit(ex.meta, ex.segments[3]) == 1.0
        assert sc.score_edit(ex.meta, ex.segments[1]) == 0.0  # the unedited source fails
    for ex in _examples("grounding", 30):
        assert sc.score_grounding(ex.meta, ex.segments[1]) == 1.0
        assert sc.score_grounding(ex.meta, blank) == 0.0
        assert sc.score_grounding(ex.meta, np.roll(ex.segments[1], RES // 3, axis=1)) == 0.0
    for ex in _examples("control", 30):
        assert sc.score_control(ex.meta, ex.segments[3]) == 1.0
        assert sc.score_control(ex.meta, blank) == 0.0
