"""easy-VQA (the embedded default): the `easy_vqa` package's images and questions.

Each image gets a caption ("a blue triangle") from the colour and shape its own questions reveal.
"""
from __future__ import annotations

import json
import re

from pipeline.config import PrepareConfig
from pipeline.manifest import Split
from pipeline.paths import package_dir
from pipeline.sources.common import TRAIN_ROLE, Role, image_row

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def attributes_of(questions: list[tuple[str, str]]) -> dict[str, str]:
    """Colour and shape of one easy-VQA image from its own questions and answers.

    Open questions give a value directly ("what color is the triangle?" -> blue,
    and triangle from the question). Yes/no questions ("is there not a red shape?"
    -> no) give presence (sets the value) or absence (eliminates it; the last
    value left standing is the answer).
    """
    known: dict[str, str] = {}
    excluded: dict[str, set[str]] = {"color": set(), "shape": set()}
    vocab = {"color": COLORS, "shape": SHAPES}
    for question, answer in questions:
        words = set(re.findall(r"[a-z]+", question.lower()))
        mentioned = {k: [w for w in v if w in words] for k, v in vocab.items()}
        if answer in ("yes", "no"):
            present = (answer == "yes") != bool(words & {"not", "no"})
            for key, values in mentioned.items():
                for value in values:
                    if present:
                        known[key] = value
                    else:
                        excluded[key].add(value)
            continue
        for key, values in vocab.items():
            if answer in values:
                known[key] = answer
            elif len(mentioned[key]) == 1:
                known[key] = mentioned[key][0]
    for key, values in vocab.items():
        left = [v for v in values if v not in excluded[key]]
        if key not in known and len(left) == 1:
            known[key] = left[0]
    return known


def caption_of(attributes: dict[str, str]) -> str:
    """'a blue triangle'; an unknown attribute is left out ('a blue shape', 'a triangle')."""
    color = attributes.get("color")
    shape = attributes.get("shape", "shape")
    return f"a {color} {shape}" if color else f"a {shape}"


def load(cfg: PrepareConfig | None = None, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Both of the package's splits (it needs no params)."""
    root = package_dir("easy_vqa")
    splits, report = [], {}
    for name in ("train", "test"):
        qs = json.loads((root / "data" / name / "questions.json").read_text())
        image_dir = root / "data" / name / "images"
        by_image: dict[int, list[tuple[str, str]]] = {}
        questions = []
        for index, (question, answer, image_id) in enumerate(qs):
            by_image.setdefault(image_id, []).append((question, answer))
            questions.append(
                {"question_id": f"{name}-{index}", "image_id": str(image_id), "question": question, "answers": [answer],
                 "question_type": "", "answer_type": ""}
            )
        ids = sorted(int(p.stem) for p in image_dir.glob("*.png"))
        counts = {"images": len(ids), "questions": len(questions), "both": 0, "color_only": 0, "shape_only": 0,
                  "neither": 0, "no_questions": 0}
        images = []
        for image_id in ids:
            own = by_image.get(image_id, [])
            attributes = attributes_of(own)
            if not own:
                counts["no_questions"] += 1
            else:
                counts[{2: "both", 0: "neither"}.get(len(attributes)) or f"{next(iter(attributes))}_only"] += 1
            images.append(image_row(root, f"data/{name}/images/{image_id}.png", str(image_id),
                                    [caption_of(attributes)] if own else [], attributes))
        counts["distinct_captions"] = len({c for row in images for c in row.captions})
        report[name] = counts
        splits.append(Split(name, "package:easy_vqa", images, questions))
    return splits, report
