"""Supervised fine-tuning task formats (CM3Leon §4, Table 5) as data, and their token layout.

An SFT example is a list of segments, each a text string or a uint8 [H, W, 3] image, joined
by `<break>`; text and answers come before the image, as in the paper:

    caption    `Describe the given picture. {caption} <break> {image}`
    vqa        `Question: {question} Answer: {answer}. <break> {image}`
    grounding  `Generate high quality image of {caption} with segmentations
                {label} at (x1, y1) -> (x2, y2), ... <break> {image}`
    edit       `{instruction} <break> {source image} <break> {edit text} <break> {target image}`
    control    `{instruction} <break> {condition map} <break> {caption} <break> {target image}`
    ocr        `Write "{text}". <break> {image of the text}`  (the paper's "how-to-write")
    scienceqa  `Question: {question} Options: (A) .. (B) .. Answer: (B) ... <break> {image}`

Each task has several phrasings (`PHRASINGS`); which one an example uses is drawn from its
own seed, unless the example brings its own (a JSONL record's `prompt`, a template over the
same fields), which is how datasets with their own instructions are expressed. Boxes are
pixel boxes of the image given to the tokenizer, end exclusive.
`tokenize_example` turns segments into vocabulary ids (cm3leon_jax.vocab owns every id).
Examples come from the built-in suite (sft/shapes_suite.py) or JSONL files (sft/jsonl.py).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Union

import numpy as np

from cm3leon_jax.config.sft import TASKS
from cm3leon_jax.vocab import Vocab

# Phrasings per task; the first of each is the paper's (Table 5).
PHRASINGS: dict[str, tuple[str, ...]] = {
    "caption": ("Describe the given picture. {caption}",
                "Describe the image. {caption}",
                "What does this picture show? {caption}",
                "Write a caption for the image. {caption}"),
    "vqa": ("Question: {question} Answer: {answer}.",
            "Q: {question} A: {answer}.",
            "Answer the question about the image. {question} {answer}."),
    "grounding": ("Generate high quality image of {caption} with segmentations {objects}.",
                  "Draw {caption} with {objects}.",
                  "Create an image of {caption}, placing {objects}."),
    "edit": ("Edit the image following the text instruction.",
             "Change the picture as the instruction says.",
             "Apply the edit to the image."),
    "control": ("Generate high quality image following the {condition} map.",
                "Render an image from the {condition} map.",
                "Make a picture that matches the {condition} map."),
    # ours: the paper names these tasks (Table 5) but prints no template for them
    "ocr": ('Write "{text}".', 'How to write "{text}"?', 'An image of the words "{text}".'),
    "scienceqa": ("Question: {question} Options: {choices} Answer: {answer}.",
                  "{question} Choose from {choices}. Answer: {answer}.",
                  "Answer the science question. {question} Options: {choices} The answer is "
                  "{answer}."),
}

ANSWER_FIELD = {"caption": "caption", "vqa": "answer", "scienceqa": "answer"}  # text answers

Segment = Union[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One task instance: `segments` joined by `<break>`; `meta` is its ground truth."""

    task: str
    id: str
    segments: tuple  # of Segment
    meta: dict


def format_box(box) -> str:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f"({x1}, {y1}) -> ({x2}, {y2})"


def grounding_objects(objects) -> str:
    """`red circle at (3, 4) -> (10, 12), blue cross at ...` from (label, box) pairs."""
    return ", ".join(f"{label} at {format_box(box)}" for label, box in objects)


def format_choices(choices) -> str:
    """`(A) first (B) second ...`: ScienceQA's options as the prompt lists them."""
    return " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))


def placeholders(template: str) -> set[str]:
    """The `{field}` names of a template (ValueError on unbalanced braces)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def format_example(task: str, fields: dict, phrasing: int, example_id: str,
                   meta: dict | None = None, template: str | None = None) -> SFTExample:
    """The segments of `task` from its fields (texts, images) in phrasing `phrasing`, or in
    the example's own `template` (a phrasing with the same fields). A text task's meta gets
    "prefix": its text segment up to the answer (what a generation prompt gives)."""
    if task not in PHRASINGS:
        raise ValueError(f"unknown SFT task {task!r} (known: {', '.join(TASKS)})")
    template = template or PHRASINGS[task][phrasing % len(PHRASINGS[task])]
    f = fields
    texts = {}  # a text task's template fields
    if task == "caption":
        texts = {"caption": f["caption"]}
        segments = (template.format(**texts), f["image"])
    elif task == "vqa":
        texts = {"question": f["question"], "answer": f["answer"]}
        segments = (template.format(**texts), f["image"])
    elif task == "grounding":
        text = template.format(caption=f["caption"], objects=grounding_objects(f["objects"]))
        segments = (text, f["image"])
    elif task == "edit":
        segments = (template.format(), f["image"], f["edit"], f["target"])
    elif task == "control":
        segments = (template.format(condition=f["condition"]), f["condition_image"],
                    f["caption"], f["image"])
    elif task == "ocr":
        segments = (template.format(text=f["text"]), f["image"])
    else:  # scienceqa: `answer` indexes `choices`
        texts = {"question": f["question"], "choices": format_choices(f["choices"]),
                 "answer": f"({chr(65 + f['answer'])}) {f['choices'][f['answer']]}"}
        segments = (template.format(**texts), f["image"])
    meta = dict(meta or {})
    if task in ANSWER_FIELD:
        meta["prefix"] = template.split("{" + ANSWER_FIELD[task] + "}")[0].format(**texts)
    return SFTExample(task, example_id, segments, meta)


def tokenize_example(example: SFTExample, encode_text: Callable[[str], np.ndarray],
                     encode_images: Callable[[np.ndarray], np.ndarray], vocab: Vocab) -> np.ndarray:
    """int32 vocabulary ids: each segment's ids, `<break>` between segments.

    `encode_text` gives sentencepiece piece ids for a string; `encode_images` codebook codes
    [B, T] for uint8 images [B, R, R, 3] (the images of one example go in one call).
    """
    images = [s for s in example.segments if not isinstance(s, str)]
    codes = iter(encode_images(np.stack(images)) if images else ())
    parts = []
    for i, seg in enumerate(example.segments):
        if i:
            parts.append(np.asarray([vocab.brk], np.int32))
        if isinstance(seg, str):
            parts.append(vocab.text_ids(encode_text(seg)))
        else:
            parts.append(vocab.image_ids(next(codes)))
    return np.concatenate(parts).astype(np.int32)
