"""VQAv2: a questions JSON and its annotations, over COCO images."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.manifest import Split
from pipeline.sources.common import (TRAIN_ROLE, Role, existing_folder, field_of, image_row, read_json,
                                     require_keys, split_counts)

def vqav2_image(root: Path, subtype: str, image_id: int) -> str | None:
    """COCO's file name for an image (COCO_val2014_000000000042.jpg), directly under the root or in
    its <subtype>/ folder as the COCO zips unpack; None when neither is there."""
    name = f"COCO_{subtype}_{image_id:012d}.jpg"
    return next((rel for rel in (name, f"{subtype}/{name}") if (root / rel).is_file()), None)


def vqav2_answers(path: Path, key: str) -> tuple[dict[str, tuple[list[str], str, str]], str | None]:
    """question_id -> (the human answers, question_type, answer_type) of a VQAv2 annotations file,
    and its data_subtype."""
    doc = read_json(path, key)
    out = {}
    for i, ann in enumerate(field_of(doc, "annotations", path, "top level", list)):
        where = f"annotations[{i}]"
        qid = str(field_of(ann, "question_id", path, where, (int, str)))
        given = field_of(ann, "answers", path, where, list)
        if not given:
            raise DatasetError(f"{path}: {where}.answers: empty")
        answers = [field_of(a, "answer", path, f"{where}.answers[{k}]", str) for k, a in enumerate(given)]
        out[qid] = (answers, field_of(ann, "question_type", path, where, str),
                    field_of(ann, "answer_type", path, where, str))
    return out, doc.get("data_subtype") if isinstance(doc, dict) else None


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """VQAv2: a questions file ({"data_subtype", "questions": [{"question_id", "image_id", "question"}]})
    and its annotations ({"annotations": [{"question_id", "answers": [{"answer"} x10], "question_type",
    "answer_type"}]}); images are COCO's. A train* subtype gives the train split, any other the test
    split. The images get no captions: VQAv2 has none."""
    require_keys(cfg, role, "vqav2", "folder", "annotations", "questions")
    root, q_path, a_path = existing_folder(cfg, role), Path(cfg.questions), Path(cfg.annotations)
    answers_of, a_subtype = vqav2_answers(a_path, role.key('annotations'))
    doc = read_json(q_path, role.key("questions"))
    subtype = field_of(doc, "data_subtype", q_path, "top level", str)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", subtype):  # it names image files and a folder: checked before any stat
        raise DatasetError(f"{q_path}: data_subtype {subtype!r}: expected a plain name like val2014 (refused, no path "
                           "was looked at)")
    if a_subtype is not None and a_subtype != subtype:
        raise DatasetError(f"{a_path}: data_subtype {a_subtype!r} differs from the questions file's {subtype!r}")
    questions, image_ids = [], {}
    for i, q in enumerate(field_of(doc, "questions", q_path, "top level", list)):
        where = f"questions[{i}]"
        qid = str(field_of(q, "question_id", q_path, where, (int, str)))
        image_id = field_of(q, "image_id", q_path, where, int)
        text = field_of(q, "question", q_path, where, str)
        if qid not in answers_of:
            raise DatasetError(f"{a_path}: no annotation for question_id {qid} ({q_path}: {where})")
        answers, question_type, answer_type = answers_of[qid]
        questions.append({"question_id": qid, "image_id": str(image_id), "question": text, "answers": answers,
                          "question_type": question_type, "answer_type": answer_type})
        image_ids.setdefault(image_id, where)
    images = []
    for image_id, where in image_ids.items():
        rel = vqav2_image(root, subtype, image_id)
        if rel is None:
            raise DatasetError(f"{q_path}: {where}.image_id: image COCO_{subtype}_{image_id:012d}.jpg not found "
                               f"under {role.key('folder')} {root} (nor in its {subtype}/ folder)")
        images.append(image_row(root, rel, str(image_id), where=f"{q_path}: {where}"))
    split = Split("train" if subtype.startswith("train") else "test", role.root, images, questions)
    report = split_counts([split])
    report[split.name] |= {"questions": len(questions),
                           "answer_types": dict(sorted(Counter(q["answer_type"] for q in questions).items()))}
    return [split], report
