"""SFT data from JSONL files, one record per line with a `task` field: COCO-style captions,
VQA2-style question/answer, InstructPix2Pix-style edit triples, detection boxes,
condition-map pairs, rendered text (OCR, "how-to-write") and ScienceQA-style multiple
choice. A record may bring its own `prompt`: a template over the task's fields that replaces
the built-in phrasings (`Render the words "{text}" in chalk.`). Every line is checked before
any image is read; a bad one raises `SFTDataError` naming the file, the line and the key.
Files and images may be on cloud storage (storage.py).
"""

from __future__ import annotations

import json
import numbers
import string

from cm3leon_jax import storage
from cm3leon_jax.data.sources import BadRecord, fit_image, read_image
from cm3leon_jax.sft.tasks import (ANSWER_FIELD, PHRASINGS, SFTExample, format_example,
                                   placeholders)


class SFTDataError(ValueError):
    """A JSONL record that cannot become an SFT example; the message names file:line."""


# Per task: the fields a record needs and their kinds ("text", "image" path, "boxes",
# "choices": a list of option strings, "choice": the right option's index in it).
JSONL_FIELDS: dict[str, dict[str, str]] = {
    "caption": {"image": "image", "caption": "text"},  # COCO captions, Flickr30k
    "vqa": {"image": "image", "question": "text", "answer": "text"},  # VQA2, OKVQA
    "edit": {"image": "image", "edit": "text", "target": "image"},  # InstructPix2Pix triples
    "grounding": {"image": "image", "caption": "text", "objects": "boxes"},  # detection
    "control": {"image": "image", "condition_image": "image", "condition": "text",
                "caption": "text"},  # ControlNet-style condition -> image
    "ocr": {"image": "image", "text": "text"},  # rendered text ("how-to-write")
    "scienceqa": {"image": "image", "question": "text", "choices": "choices",
                  "answer": "choice"},  # ScienceQA: `answer` indexes `choices`
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
        if kind == "choices" and (not isinstance(value, list) or not 2 <= len(value) <= 26 or
                                  not all(isinstance(c, str) and c.strip() for c in value)):
            raise SFTDataError(f"{where}: key {key!r} must be a list of 2 to 26 non-empty "
                               f"strings, got {value!r}")
        if kind == "choice":
            n = len(record.get("choices", ()))
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
                raise SFTDataError(f"{where}: key {key!r} must be the index of the right "
                                   f"choice, an integer in [0, {n}), got {value!r}")
    if "prompt" in record:
        _check_prompt(record["prompt"], task, where)
    return record


def _check_prompt(prompt, task: str, where: str) -> None:
    """A record's own template must use exactly the fields of the task's phrasings."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise SFTDataError(f"{where}: key 'prompt' must be a non-empty string, got {prompt!r}")
    want = placeholders(PHRASINGS[task][0])
    try:
        got = placeholders(prompt)
    except ValueError as e:
        raise SFTDataError(f"{where}: key 'prompt' is not a template ({e}); write a literal "
                           "brace as {{ or }}") from None
    if got != want:
        need = " ".join("{" + f + "}" for f in sorted(want)) or "no {field}"
        raise SFTDataError(f"{where}: key 'prompt' of task {task!r} must use {need}, got "
                           f"{sorted(got)} in {prompt!r}")
    if task in ANSWER_FIELD:  # a generation prompt is the text before the answer
        tail = prompt.split("{" + ANSWER_FIELD[task] + "}")[-1]
        if tail.strip(string.punctuation + string.whitespace):
            raise SFTDataError(f"{where}: key 'prompt' of task {task!r} must end with "
                               f"{{{ANSWER_FIELD[task]}}} (punctuation may follow), got "
                               f"{prompt!r}")


def read_sft_jsonl(path: storage.PathLike) -> list[dict]:
    """Every record of an SFT JSONL file, checked (no images read yet).

    Each record gets `_where` ("file:line") for later errors and `_dir` for image paths.
    """
    path = storage.path(path)
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
    where, task = record["_where"], record["task"]
    fields, scale = {}, None
    for key, kind in JSONL_FIELDS[task].items():
        if kind != "image":
            fields[key] = record[key]
            continue
        try:
            image = read_image(storage.path(record["_dir"]) / record[key], where)
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
                          {k: v for k, v in record.items() if not k.startswith("_")},
                          template=record.get("prompt"))


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
