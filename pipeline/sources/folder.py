"""A folder of images with captions.csv or captions.json (columns image, caption[, split])."""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.manifest import Split
from pipeline.sources.common import (TRAIN_ROLE, CaptionScreen, Role, existing_folder, image_row,
                                     load_json, refuse_outside, split_by_content, split_counts, split_name)


def read_caption_rows(folder: Path) -> tuple[Path, list[dict]]:
    """The rows of captions.csv or captions.json (UTF-8); a file that cannot be read as such is one line."""
    csv_path, json_path = folder / "captions.csv", folder / "captions.json"
    try:
        if csv_path.exists():
            with open(csv_path, newline="", encoding="utf-8") as f:
                # strict: a quote left open is an error, not a field that swallows the rest of the file
                reader = csv.DictReader(f, strict=True)
                missing = {"image", "caption"} - set(reader.fieldnames or [])
                if missing:
                    raise DatasetError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))} "
                                       "(need image, caption[, split])")
                rows = list(reader)
            if not rows:
                raise DatasetError(f"{csv_path}: a header and no rows (need one row per image and caption)")
            return csv_path, rows
        if json_path.exists():
            rows = load_json(json_path)
            if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image", "caption"} <= r.keys()
                                                     for r in rows):
                raise DatasetError(f"{json_path}: expected a list of objects with keys image, caption[, split]")
            if not rows:
                raise DatasetError(f"{json_path}: an empty list (need one object per image and caption)")
            return json_path, rows
    except UnicodeDecodeError as err:
        path = csv_path if csv_path.exists() else json_path
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DatasetError(f"{csv_path}: not a readable CSV file ({err})") from None
    raise DatasetError(f"{folder}: no captions.csv or captions.json found")


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Images listed in the captions file (paths inside the folder); split by its split column, or by
    image hash (prepare.test_fraction) for images without one. A path leaving the folder (absolute,
    `..`, a symlink out) stops prepare naming its row, before anything there is read; rows of one image
    gather its captions; captions that are empty, overlong or hold control characters are skipped and
    reported."""
    if not cfg.folder:
        raise ConfigError(f"params.yaml: {role.key('folder')}: must be set when {role.key('source')} is folder")
    folder = existing_folder(cfg, role)
    source, rows = read_caption_rows(folder)
    screen = CaptionScreen()
    images = {}  # image path -> row, in first-seen order
    split_of: dict[str, str] = {}
    for line, row in enumerate(rows, start=2 if source.suffix == ".csv" else 0):
        where = f"{source}: {'row' if source.suffix == '.csv' else 'entry'} {line}"
        rel = row["image"].strip() if isinstance(row["image"], str) else None
        if not rel:
            raise DatasetError(f"{where}: image {row['image']!r} must be a path inside {folder}")
        if rel not in images:
            refuse_outside(folder, rel, where)
            if not (folder / rel).is_file():
                raise DatasetError(f"{where}: image file {rel} not found")
            images[rel] = image_row(folder, rel, rel, where=where)
        caption = screen(row["caption"], where)
        if caption is not None:
            images[rel].captions.append(caption)
        split = row.get("split") or ""
        split = split_name(split.strip() if isinstance(split, str) else split, where) if split else ""
        if split:
            if split_of.setdefault(rel, split) != split:
                raise DatasetError(f"{where}: image {rel} appears in splits {split_of[rel]} and {split}")
    for rel, row in images.items():
        if rel not in split_of:
            split_of[rel] = split_by_content(row.image_sha256, cfg.test_fraction)
    names = sorted(set(split_of.values()))
    splits = [Split(n, role.root, [r for k, r in images.items() if split_of[k] == n]) for n in names]
    return splits, split_counts(splits) | screen.report()
