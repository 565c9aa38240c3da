"""CC3M: the caption/URL TSV with the images img2dataset downloaded beside it (its `files` output)."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.images import path_problem
from pipeline.manifest import Split
from pipeline.sources.common import (TRAIN_ROLE, CaptionScreen, Role, existing_folder, field_of, image_row,
                                     load_json, require_keys, split_by_content, split_counts)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_cc3m_tsv(path: Path, key: str) -> list[tuple[int, str, str]]:
    """(line, caption, url) of CC3M's TSV (Train_GCC-training.tsv): caption<TAB>image URL, no header;
    the `caption<TAB>url` header img2dataset's instructions add in place is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line, text in enumerate(f, start=1):
                text = text.rstrip("\r\n")
                if not text.strip() or (line == 1 and text.strip().lower() == "caption\turl"):
                    continue
                fields = text.split("\t")
                if len(fields) != 2:
                    raise DatasetError(f"{path}: line {line}: expected 2 tab-separated fields (caption, url), "
                                       f"got {len(fields)}")
                caption, url = fields[0], fields[1].strip()
                if not url:
                    raise DatasetError(f"{path}: line {line}: empty url")
                rows.append((line, caption, url))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found ({key})") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return rows


def img2dataset_files(folder: Path) -> dict[str, str]:
    """url -> image path (relative to folder) of each image in img2dataset's `files` output
    (<shard>/<key>.jpg beside <key>.json). The sidecar's "url" ties an image to its TSV row whatever
    key scheme the download used; the first image of a URL downloaded twice wins."""
    found: dict[str, str] = {}
    for meta_path in sorted(folder.glob("*/*.json")):
        problem = path_problem(folder, meta_path.relative_to(folder).as_posix())
        if problem:
            raise DatasetError(f"{meta_path}: is {problem} (refused, nothing was read)")
        meta = load_json(meta_path)
        url = field_of(meta, "url", meta_path, "img2dataset metadata", str)
        if meta.get("status", "success") != "success":
            continue
        image = next((p for p in map(meta_path.with_suffix, IMAGE_SUFFIXES) if p.is_file()), None)
        if image is not None:
            found.setdefault(url, image.relative_to(folder).as_posix())
    return found


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """CC3M as distributed (caption/URL TSV) with the images img2dataset downloaded beside it. Rows whose
    image is not there (dead links are common) are counted, not fatal; a URL listed twice is one image
    with both captions. Split by image hash (prepare.test_fraction): CC3M has no test split of its own."""
    require_keys(cfg, role, "cc3m", "folder", "annotations")
    folder = existing_folder(cfg, role)
    downloaded = img2dataset_files(folder)
    images = {}  # image path -> row, in TSV order
    missing: list[int] = []
    used: set[str] = set()
    tsv = Path(cfg.annotations)
    screen = CaptionScreen()
    for line, caption, url in read_cc3m_tsv(tsv, role.key('annotations')):
        rel = downloaded.get(url)
        if rel is None:
            missing.append(line)
            continue
        used.add(url)
        if rel not in images:
            images[rel] = image_row(folder, rel, rel, where=f"{tsv}: line {line}")
        caption = screen(caption, f"{tsv}: line {line}")
        if caption is not None:
            images[rel].captions.append(caption)
    by_split: dict[str, list] = {}
    for row in images.values():
        by_split.setdefault(split_by_content(row.image_sha256, cfg.test_fraction), []).append(row)
    splits = [Split(name, role.root, rows) for name, rows in sorted(by_split.items())]
    report = {"missing": {"count": len(missing), "first_lines": missing[:10]},
              "downloads_not_in_tsv": len(downloaded) - len(used)}
    return splits, split_counts(splits) | report | screen.report()
