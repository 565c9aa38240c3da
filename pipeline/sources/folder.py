"""A folder of images with captions.csv or captions.json (columns image, caption[, split])."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.manifest import Split, image_row
from pipeline.sources.common import TRAIN_ROLE, Role, existing_folder, split_by_content, split_counts


def read_caption_rows(folder: Path) -> tuple[Path, list[dict]]:
    csv_path, json_path = folder / "captions.csv", folder / "captions.json"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))} (need image, caption[, split])")
            return csv_path, list(reader)
    if json_path.exists():
        try:
            rows = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{json_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image", "caption"} <= r.keys() for r in rows):
            raise DatasetError(f"{json_path}: expected a list of objects with keys image, caption[, split]")
        return json_path, rows
    raise DatasetError(f"{folder}: no captions.csv or captions.json found")


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Images listed in the captions file (paths inside the folder); split by its split column, or by
    image hash (prepare.test_fraction) for images without one."""
    if not cfg.folder:
        raise ConfigError(f"params.yaml: {role.key('folder')}: must be set when {role.key('source')} is folder")
    folder = existing_folder(cfg, role)
    source, rows = read_caption_rows(folder)
    images = {}  # image path -> row, in first-seen order
    split_of: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        rel = str(row["image"]).strip()
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DatasetError(f"{source}: row {line}: image {rel!r} must be a path inside {folder}")
        if rel not in images:
            if not (folder / rel).is_file():
                raise DatasetError(f"{source}: row {line}: image file {rel} not found")
            images[rel] = image_row(folder, rel, rel)
        images[rel].captions.append(str(row["caption"]).strip())
        split = (row.get("split") or "").strip()
        if split:
            if split_of.setdefault(rel, split) != split:
                raise DatasetError(f"{source}: row {line}: image {rel} appears in splits {split_of[rel]} and {split}")
    for rel, row in images.items():
        if rel not in split_of:
            split_of[rel] = split_by_content(row.image_sha256, cfg.test_fraction)
    names = sorted(set(split_of.values()))
    splits = [Split(n, role.root, [r for k, r in images.items() if split_of[k] == n]) for n in names]
    return splits, split_counts(splits)
