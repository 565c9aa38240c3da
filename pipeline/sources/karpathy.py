"""COCO / Flickr30k in Karpathy's split file (dataset_coco.json)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.manifest import Split, image_row
from pipeline.sources.common import TRAIN_ROLE, Role, require_keys, split_counts


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Karpathy's split file: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}.
    "restval" joins train (as in the usual COCO training set); image paths are relative to prepare.folder."""
    require_keys(cfg, role, "karpathy", "folder", "annotations")
    path, root = Path(cfg.annotations), Path(cfg.folder)
    try:
        entries = json.loads(path.read_text())["images"]
        rows = [(str(Path(e.get("filepath", "")) / e["filename"]), e["split"], [s["raw"].strip() for s in e["sentences"]])
                for e in entries]
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotations file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not a Karpathy split file ({type(err).__name__}: {err})") from None
    by_split: dict[str, list] = {}
    for rel, split, captions in rows:
        if not (root / rel).is_file():
            raise DatasetError(f"{path}: image {rel} not found under {role.key('folder')} {root}")
        by_split.setdefault("train" if split == "restval" else split, []).append(image_row(root, rel, rel, captions))
    splits = [Split(name, role.root, images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits)
