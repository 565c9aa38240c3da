"""COCO / Flickr30k in Karpathy's split file (dataset_coco.json)."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.manifest import Split
from pipeline.sources.common import (TRAIN_ROLE, CaptionScreen, Role, image_row, load_json, refuse_outside,
                                     require_keys, split_counts, split_name)


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Karpathy's split file: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}.
    "restval" joins train (as in the usual COCO training set); image paths are relative to prepare.folder.
    An entry whose path leaves the folder (an absolute filepath, `..`, a symlink out) or repeats an
    earlier entry's image stops prepare naming it; odd captions are skipped and reported."""
    require_keys(cfg, role, "karpathy", "folder", "annotations")
    path, root = Path(cfg.annotations), Path(cfg.folder)
    screen = CaptionScreen()
    try:
        entries = load_json(path)["images"]
        rows = [(i, str(PurePosixPath(e.get("filepath", "")) / e["filename"]), e["split"],
                 [c for j, s in enumerate(e["sentences"])
                  if (c := screen(s["raw"], f"{path}: images[{i}].sentences[{j}]")) is not None])
                for i, e in enumerate(entries)]
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotations file not found") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not a Karpathy split file ({type(err).__name__}: {err})") from None
    by_split: dict[str, list] = {}
    first_entry: dict[str, int] = {}
    for i, rel, split, captions in rows:
        where = f"{path}: images[{i}]"
        split = split_name(split, where)
        refuse_outside(root, rel, where)
        if rel in first_entry:
            raise DatasetError(f"{where}: image {rel} is also images[{first_entry[rel]}] (duplicate entry)")
        first_entry[rel] = i
        if not (root / rel).is_file():
            raise DatasetError(f"{path}: image {rel} not found under {role.key('folder')} {root}")
        by_split.setdefault("train" if split == "restval" else split, []).append(
            image_row(root, rel, rel, captions, where=where))
    splits = [Split(name, role.root, images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits) | screen.report()
