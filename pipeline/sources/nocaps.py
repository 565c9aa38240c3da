"""NoCaps: a COCO-style captions JSON; test data only, each image with its domain."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.manifest import DOMAIN, Split
from pipeline.sources.common import (TRAIN_ROLE, CaptionScreen, Role, existing_folder, field_of, image_row,
                                     read_json, refuse_outside, require_keys, split_counts)

def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """NoCaps (nocaps_val_4500_captions.json): {"images": [{"id", "file_name", "domain"}],
    "annotations": [{"image_id", "caption"}]}; images under prepare.folder by file_name. Everything is
    test data; each image keeps its domain (in-/near-/out-domain) in its attributes for per-domain
    CIDEr. The test set's image-info file has no "annotations": its images get no captions."""
    require_keys(cfg, role, "nocaps", "folder", "annotations")
    root, path = existing_folder(cfg, role), Path(cfg.annotations)
    doc = read_json(path, role.key("annotations"))
    screen = CaptionScreen()
    images = {}
    for i, entry in enumerate(field_of(doc, "images", path, "top level", list)):
        where = f"images[{i}]"
        image_id = str(field_of(entry, "id", path, where, (int, str)))
        name = field_of(entry, "file_name", path, where, str)
        domain = field_of(entry, "domain", path, where, str)
        refuse_outside(root, name, f"{path}: {where}.file_name")
        if not (root / name).is_file():
            raise DatasetError(f"{path}: {where}.file_name: image {name} not found under {role.key('folder')} {root}")
        if image_id in images:
            raise DatasetError(f"{path}: {where}.id: {image_id} is the id of an earlier image (duplicate id)")
        images[image_id] = image_row(root, name, image_id, [], {DOMAIN: domain}, where=f"{path}: {where}")
    annotations = field_of(doc, "annotations", path, "top level", list) if "annotations" in doc else []
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = str(field_of(ann, "image_id", path, where, (int, str)))
        caption = screen(field_of(ann, "caption", path, where, str), f"{path}: {where}.caption")
        if image_id not in images:
            raise DatasetError(f"{path}: {where}.image_id: {image_id} is not an image of the file")
        if caption is not None:
            images[image_id].captions.append(caption)
    split = Split("test", role.root, list(images.values()))
    report = split_counts([split])
    report["test"]["domains"] = dict(sorted(Counter(r.labels[DOMAIN]
                                                    for r in split.images).items()))
    return [split], report | screen.report()
