"""Generation prompts for the SFT tasks, in the layout SFT trained on (sft/tasks.py).

Training documents are `<eos> segment <break> segment ... <eos>` under the CM3 objective, so
a task is asked the way its training document would look:

- caption, vqa, scienceqa (the answer is text, written before the image): the whole text segment is
  masked, as CM3's whole-segment spans (`data.whole_segment`) train, and its infill is started
  with the instruction: `<eos> <mask:0> <break> image <eos> <mask:0> instruction` → the
  answer, then `<eoss>` (CM3Leon's "Image of <mask> ... <infill>" captioning, with the
  question given; the VQA answer's final "." is part of the answer).
- grounding, ocr (text -> image): `<eos> text <break>`, then the image; the classifier-free
  unconditional stream masks the text, `<eos> <mask:0> <break>` (as pretraining).
- edit, control (instruction, condition image, text -> image): `<eos> instruction <break>
  condition <break> text <break>`, then the image, with two-scale guidance (CM3Leon §4.1):
  the image-only stream masks the text, the unconditional one masks condition and text.

Every prompt here is a pure function of the example and the two encoders, so it is
checked on plain numpy (tests/test_eval_sft.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cm3leon_jax.sft.tasks import ANSWER_FIELD, SFTExample
from cm3leon_jax.vocab import Vocab

GUIDANCE = {"grounding": "cfg", "ocr": "cfg", "edit": "two_scale", "control": "two_scale"}


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
    """What to decode for one example: `streams` = (prompt,) for text; for images the
    conditional prompt first, then `generate.decode`'s order (unconditional, image-only)."""
    kind: str  # "text" or "image"
    streams: tuple


def instruction_prefix(example: SFTExample) -> str:
    """The text segment up to the answer (format_example's meta["prefix"])."""
    return example.meta["prefix"].rstrip()


def _text_ids(encode_text, vocab: Vocab, text: str) -> np.ndarray:
    return vocab.text_ids(encode_text(text)).astype(np.int32)


def task_prompt(example: SFTExample, encode_text: Callable[[str], np.ndarray],
                encode_images: Callable[[np.ndarray], np.ndarray], vocab: Vocab) -> TaskPrompt:
    """The prompt(s) asking `example`'s answer (its last text or image segment)."""
    segs = example.segments
    shown = segs if example.task in ANSWER_FIELD else segs[:-1]  # not the image asked for
    images = [s for s in shown if not isinstance(s, str)]
    codes = ([vocab.image_ids(c).astype(np.int32) for c in encode_images(np.stack(images))]
             if images else [])
    eos, brk, m0, m1 = vocab.eos, vocab.brk, vocab.sentinel(0), vocab.sentinel(1)
    if example.task in ANSWER_FIELD:
        full = _text_ids(encode_text, vocab, segs[0])
        head = _text_ids(encode_text, vocab, instruction_prefix(example))
        if not np.array_equal(full[:len(head)], head):
            raise ValueError(f"{example.id}: the instruction's tokens are not a prefix of the "
                             f"text segment's ({segs[0]!r}); the text tokenizer splits the "
                             "answer into the instruction")
        prompt = np.concatenate([[eos, m0, brk], codes[0], [eos, m0], head])
        return TaskPrompt("text", (prompt.astype(np.int32),))
    guidance = GUIDANCE.get(example.task)
    if guidance is None:
        raise ValueError(f"{example.id}: no evaluation prompt for task {example.task!r}")
    if guidance == "cfg":  # text -> image
        cond = np.concatenate([[eos], _text_ids(encode_text, vocab, segs[0]), [brk]])
        uncond = np.array([eos, m0, brk])
        return TaskPrompt("image", (cond.astype(np.int32), uncond.astype(np.int32)))
    instruction, condition, text = segs[0], codes[0], segs[2]
    head = np.concatenate([[eos], _text_ids(encode_text, vocab, instruction), [brk]])
    full = np.concatenate([head, condition, [brk], _text_ids(encode_text, vocab, text), [brk]])
    image_only = np.concatenate([head, condition, [brk, m0, brk]])
    uncond = np.concatenate([head, [m0, brk, m1, brk]])
    return TaskPrompt("image", tuple(s.astype(np.int32) for s in (full, uncond, image_only)))


def target_image(example: SFTExample) -> np.ndarray:
    """The image the task asks for (the last segment)."""
    return example.segments[-1]


def condition_image(example: SFTExample) -> np.ndarray | None:
    """The image the prompt shows (edit source, control map); None for text-only prompts."""
    return example.segments[1] if len(example.segments) == 4 else None


def answer_text(example: SFTExample) -> str:
    """The true answer of a text task: the text segment after the instruction."""
    return example.segments[0][len(instruction_prefix(example)):].strip()
