"""The synthetic SFT suite from the `shapes` scenes: five tasks, exact answers, no download.

Every example is a pure function of (seed, task, split, index): its scene comes from the
shapes world (shapes/world.py, edited with shapes/edits.py), so the ground truth in `meta`
lets evaluation score answers and generated pixels exactly (shapes/scores.py).

- caption: the scene's `shapes` caption.
- vqa: colour ("What colour is the circle?"), count ("How many red shapes are there?") and
  position ("Where is the square?") questions, answers exact words.
- edit: the same scene before and after one edit, which changes exactly the asked attribute:
  recolour ("make the circle red") or move one cell ("move the square left").
- grounding: the caption without positions and each object's pixel box.
- control: an edge or segmentation map of the scene -> the scene.

Splits: train example i uses scene stream index `i * len(SHAPES_TASKS) + task`; eval example
i the same from `EVAL_OFFSET` on, so held-out scenes are never training scenes (by index).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cm3leon_jax.config.sft import SHAPES_TASKS
from cm3leon_jax.sft.tasks import PHRASINGS, SFTExample, format_example
from cm3leon_jax.shapes.edits import (DIRECTIONS, edge_map, move, plain_caption, plural, recolour,
                                      reference, segmentation_map)
from cm3leon_jax.shapes.world import (COLOURS, NUMBERS, SHAPES, check_world, draw,
                                      shapes_caption, shapes_scene)

SPLITS = ("train", "eval")
EVAL_OFFSET = 2**40  # eval scenes start here in the scene stream
CONDITIONS = ("edge", "segmentation")
VQA_KINDS = ("colour", "count", "position")


@dataclasses.dataclass(frozen=True)
class ShapesSFT:
    """Random access to the synthetic SFT examples: `suite.example(task, split, index)`."""

    seed: int = 0
    resolution: int = 64
    max_objects: int = 3

    def __post_init__(self):
        check_world(self.resolution, self.max_objects, "sft shapes")

    def scene(self, task: str, split: str, index: int) -> list[dict]:
        if task not in SHAPES_TASKS:
            raise ValueError(f"unknown SFT task {task!r} (known: {', '.join(SHAPES_TASKS)})")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        if not 0 <= index < EVAL_OFFSET // len(SHAPES_TASKS):
            raise IndexError(f"sft shapes: index {index} out of range")
        stream = (index * len(SHAPES_TASKS) + SHAPES_TASKS.index(task)
                  + (EVAL_OFFSET if split == "eval" else 0))
        return shapes_scene(stream, self.seed, self.resolution, self.max_objects)

    def example(self, task: str, split: str, index: int) -> SFTExample:
        objects = self.scene(task, split, index)
        rng = np.random.default_rng([self.seed, SHAPES_TASKS.index(task), SPLITS.index(split),
                                     index, 1])
        phrasing = int(rng.integers(len(PHRASINGS[task])))
        image = draw(objects, self.resolution)
        fields, meta = getattr(self, f"_{task}")(objects, image, rng)
        meta = {"objects": objects, "phrasing": phrasing, **meta}
        return format_example(task, {"image": image, **fields}, phrasing,
                              f"sft-{task}-{split}-{self.seed}-{index}", meta)

    def _caption(self, objects, image, rng):
        caption = shapes_caption(objects)
        return {"caption": caption}, {"caption": caption}

    def _vqa(self, objects, image, rng):
        kind = VQA_KINDS[int(rng.integers(len(VQA_KINDS)))]
        i = int(rng.integers(len(objects)))
        if kind == "position":  # only objects nameable without their position
            named = [j for j in range(len(objects)) if reference(objects, j, False)]
            if not named:
                kind = "count"
            else:
                i = named[int(rng.integers(len(named)))]
        if kind == "colour":
            question = f"What colour is {reference(objects, i, coloured=False)}?"
            answer = objects[i]["colour"]
        elif kind == "position":
            question = f"Where is {reference(objects, i, False)}?"
            answer = objects[i]["position"]
        else:
            what = int(rng.integers(3))
            if what == 0:
                question, n = "How many shapes are there?", len(objects)
            elif what == 1:
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                question = f"How many {colour} shapes are there?"
                n = sum(o["colour"] == colour for o in objects)
            else:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                question = f"How many {plural(shape)} are there?"
                n = sum(o["shape"] == shape for o in objects)
            answer = NUMBERS[n]
        return ({"question": question, "answer": answer},
                {"kind": kind, "question": question, "answer": answer})

    def _edit(self, objects, image, rng):
        moves = [(i, d) for i, o in enumerate(objects) for d, (dr, dc) in DIRECTIONS.items()
                 if 0 <= o["cell"][0] + dr < 3 and 0 <= o["cell"][1] + dc < 3
                 and not any(p["cell"] == [o["cell"][0] + dr, o["cell"][1] + dc] for p in objects)]
        if moves and rng.random() < 0.5:
            i, direction = moves[int(rng.integers(len(moves)))]
            edit = f"move {reference(objects, i)} {direction}"
            after = move(objects, i, direction, self.resolution)
            info = {"kind": "move", "direction": direction}
        else:
            i = int(rng.integers(len(objects)))
            others = [c for c in COLOURS if c != objects[i]["colour"]]
            colour = others[int(rng.integers(len(others)))]
            edit = f"make {reference(objects, i)} {colour}"
            after = recolour(objects, i, colour)
            info = {"kind": "recolour", "colour": colour}
        target = draw(after, self.resolution)
        return ({"edit": edit, "target": target},
                {"edit": edit, "object": i, "after": after, **info})

    def _grounding(self, objects, image, rng):
        caption = plain_caption(objects)
        pairs = [(f"{o['colour']} {o['shape']}", o["bbox"]) for o in objects]
        return {"caption": caption, "objects": pairs}, {"caption": caption}

    def _control(self, objects, image, rng):
        kind = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
        cond = edge_map(image) if kind == "edge" else segmentation_map(objects, self.resolution)
        caption = shapes_caption(objects)
        return ({"condition": kind, "condition_image": cond, "caption": caption},
                {"condition": kind, "caption": caption})
