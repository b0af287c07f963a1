"""Supervised fine-tuning task formats (CM3Leon §4, Table 5) as data, and their token layout.

An SFT example is a list of segments, each a text string or a uint8 [H, W, 3] image, joined
by `<break>`; text and answers come before the image, as in the paper:

    caption    `Describe the given picture. {caption} <break> {image}`
    vqa        `Question: {question} Answer: {answer}. <break> {image}`
    grounding  `Generate high quality image of {caption} with segmentations
                {label} at (x1, y1) -> (x2, y2), ... <break> {image}`
    edit       `{instruction} <break> {source image} <break> {edit text} <break> {target image}`
    control    `{instruction} <break> {condition map} <break> {caption} <break> {target image}`

Each task has several phrasings (`PHRASINGS`); which one an example uses is drawn from its
own seed. Boxes are pixel boxes of the image given to the tokenizer, end exclusive.
`tokenize_example` turns segments into vocabulary ids (cm3leon_jax.vocab owns every id).

Real datasets come as JSONL (`read_sft_jsonl`), one record per line with a `task` field:
COCO-style captions, VQA2-style question/answer, InstructPix2Pix-style edit triples,
detection boxes and condition-map pairs. Every line is checked before any image is read; a
bad one raises `SFTDataError` naming the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Callable, Union

import numpy as np

from cm3leon_jax.vocab import Vocab

TASKS = ("caption", "vqa", "edit", "grounding", "control")

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
}

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


def format_example(task: str, fields: dict, phrasing: int, example_id: str,
                   meta: dict | None = None) -> SFTExample:
    """The segments of `task` from its fields (texts, images) in phrasing `phrasing`."""
    if task not in PHRASINGS:
        raise ValueError(f"unknown SFT task {task!r} (known: {', '.join(TASKS)})")
    template = PHRASINGS[task][phrasing % len(PHRASINGS[task])]
    f = fields
    if task == "caption":
        segments = (template.format(caption=f["caption"]), f["image"])
    elif task == "vqa":
        segments = (template.format(question=f["question"], answer=f["answer"]), f["image"])
    elif task == "grounding":
        text = template.format(caption=f["caption"], objects=grounding_objects(f["objects"]))
        segments = (text, f["image"])
    elif task == "edit":
        segments = (template, f["image"], f["edit"], f["target"])
    else:  # control
        segments = (template.format(condition=f["condition"]), f["condition_image"],
                    f["caption"], f["image"])
    return SFTExample(task, example_id, segments, dict(meta or {}))


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


# --- JSONL for real datasets ---------------------------------------------------------

class SFTDataError(ValueError):
    """A JSONL record that cannot become an SFT example; the message names file:line."""


# Per task: the fields a record needs and their kinds ("text", "image" path, "boxes").
JSONL_FIELDS: dict[str, dict[str, str]] = {
    "caption": {"image": "image", "caption": "text"},  # COCO captions, Flickr30k
    "vqa": {"image": "image", "question": "text", "answer": "text"},  # VQA2, OKVQA
    "edit": {"image": "image", "edit": "text", "target": "image"},  # InstructPix2Pix triples
    "grounding": {"image": "image", "caption": "text", "objects": "boxes"},  # detection
    "control": {"image": "image", "condition_image": "image", "condition": "text",
                "caption": "text"},  # ControlNet-style condition -> image
}


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    task = record.get("task")
    if task not in JSONL_FIELDS:
        raise SFTDataError(f"{where}: key 'task' is {task!r}, not one of {list(JSONL_FIELDS)}")
    for key, kind in JSONL_FIELDS[task].items():
        if key not in record:
            raise SFTDataError(f"{where}: task {task!r} needs key {key!r}")
        value = record[key]
        if kind in ("text", "image") and (not isinstance(value, str) or not value.strip()):
            raise SFTDataError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
        if kind == "boxes":
            if not isinstance(value, list) or not value:
                raise SFTDataError(f"{where}: key {key!r} must be a non-empty list of "
                                   '{"label": str, "box": [x1, y1, x2, y2]}')
            for j, obj in enumerate(value):
                label = obj.get("label") if isinstance(obj, dict) else None
                box = obj.get("box") if isinstance(obj, dict) else None
                if not isinstance(label, str) or not label.strip():
                    raise SFTDataError(f"{where}: {key}[{j}].label must be a non-empty string")
                if (not isinstance(box, list) or len(box) != 4 or not all(
                        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box)):
                    raise SFTDataError(f"{where}: {key}[{j}].box must be 4 numbers "
                                       f"[x1, y1, x2, y2], got {box!r}")
                if not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
                    raise SFTDataError(f"{where}: {key}[{j}].box={box} needs "
                                       "0 <= x1 < x2 and 0 <= y1 < y2")
    return record


def read_sft_jsonl(path: str | Path) -> list[dict]:
    """Every record of an SFT JSONL file, checked (no images read yet).

    Each record gets `_where` ("file:line") for later errors and `_dir` for image paths.
    """
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"SFT data file {path} does not exist")
    records = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SFTDataError(f"{where}: not UTF-8 ({e})") from None
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{where}: not JSON ({e})") from None
        records.append({**_check_record(record, where), "_where": where, "_dir": str(path.parent)})
    if not records:
        raise SFTDataError(f"{path}: no records")
    return records


def jsonl_example(record: dict, resolution: int, phrasing: int) -> SFTExample:
    """A checked record as an example: images read and fitted to `resolution`."""
    from cm3leon_jax.data.prepare import fit_image
    from cm3leon_jax.data.sources import BadRecord, read_image

    where, task = record["_where"], record["task"]
    fields, scale = {}, None
    for key, kind in JSONL_FIELDS[task].items():
        if kind != "image":
            fields[key] = record[key]
            continue
        try:
            image = read_image(Path(record["_dir"]) / record[key], where)
        except BadRecord as e:
            raise SFTDataError(f"{where}: key {key!r}: {e.reason} ({e.detail})") from None
        if key == "image":
            scale = _check_boxes(record, image.shape, where, resolution)
        fields[key] = fit_image(image, resolution)
    if task == "grounding":
        fields["objects"] = [(o["label"], [min(max(v * s + t, 0), resolution)
                                           for v, s, t in zip(o["box"], *scale)])
                             for o in record["objects"]]
    return format_example(task, fields, phrasing, str(record.get("id", where)),
                          {k: v for k, v in record.items() if not k.startswith("_")})


def _check_boxes(record: dict, shape, where: str, resolution: int):
    """Boxes must lie inside the image; returns the (scale, shift) fit_image applies to x, y."""
    h, w = shape[:2]
    for j, obj in enumerate(record.get("objects", ()) if record["task"] == "grounding" else ()):
        x1, y1, x2, y2 = obj["box"]
        if x2 > w or y2 > h:
            raise SFTDataError(f"{where}: objects[{j}].box={obj['box']} lies outside the "
                               f"{w}x{h} image")
    if (h, w) == (resolution, resolution):
        return (1, 1, 1, 1), (0, 0, 0, 0)
    s = resolution / min(h, w)
    size_w, size_h = max(resolution, round(w * s)), max(resolution, round(h * s))
    sx, sy = size_w / w, size_h / h  # the resize's exact factors per axis
    dx, dy = (size_w - resolution) // 2, (size_h - resolution) // 2
    return (sx, sy, sx, sy), (-dx, -dy, -dx, -dy)
