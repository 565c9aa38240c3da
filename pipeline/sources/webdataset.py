"""webdataset tar shards as img2dataset writes them.

A shard is `NNNNN.tar` holding, per sample, `{key}.jpg|png|webp` and `{key}.txt` and/or
`{key}.json` (a caption field); shard lists are brace patterns (`{00000..00127}.tar`) relative
to `prepare.folder`. Manifests name an image as `<shard>/<member>` (`00003.tar/000301.jpg`):
no absolute path, and extraction reads the member straight from the tar (pipeline.images),
never unpacking. A truncated shard keeps the samples before the damage and lists the rest as
skipped; a corrupt member fails to decode at extraction and is listed like any unreadable image.
Split by image hash (prepare.test_fraction), as a folder without a split column.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.images import member_problem
from pipeline.io import sha256_bytes
from pipeline.manifest import ImageRow, Split
from pipeline.sources.common import (TRAIN_ROLE, CaptionScreen, Role, existing_folder, require_keys,
                                     split_by_content, split_counts)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text", "txt")  # json fields img2dataset and its users write


def shard_paths(folder: Path, pattern: str) -> list[Path]:
    """The shards a brace pattern names, in order; a missing shard is an error naming it."""
    from braceexpand import braceexpand  # webdataset's own dependency

    paths = [folder / p for p in braceexpand(pattern)]
    if not paths:
        raise DatasetError(f"prepare.shards: {pattern!r} names no shard")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"prepare.shards: {missing[0]} not found ({len(missing)} of {len(paths)} shards missing)")
    return paths


def caption_of(sample: dict) -> object:
    """The sample's caption as stored, for the caption screen: its .txt (bytes that are not UTF-8 stay
    bytes, which the screen skips), else the first caption field of its .json; None when it has none."""
    if sample.get("txt") is not None:
        try:
            return sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return sample["txt"]
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"])
        except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, a number too long: no caption
            return None
        for name in CAPTION_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(name), str) and meta[name].strip():
                return meta[name]
    return None


def list_samples(folder: Path, pattern: str, screen: CaptionScreen) -> tuple[list[dict], list[dict]]:
    """(samples, skipped): one dict per image member {"key", "member", "shard", "sha256", "caption"},
    in shard order; `skipped` lists damaged shards, samples without an image, members whose names
    are absolute or climb out with `..`, and keys seen twice in a shard, each with the reason."""
    import webdataset as wds

    samples, skipped = [], []
    seen: set[tuple[str, str]] = set()

    def keep_going(exn: Exception) -> bool:  # a truncated or unreadable shard: list it, go on
        skipped.append({"image_id": "", "reason": f"{type(exn).__name__}: {exn}"})
        return True

    shards = shard_paths(folder, pattern)
    urls = [str(p) for p in shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, handler=keep_going, empty_check=False):
        shard = Path(sample["__url__"]).relative_to(folder).as_posix()
        key, image_id = sample["__key__"], f"{shard}/{sample['__key__']}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        problem = member_problem(key) or ("a key seen earlier in the shard" if (shard, key) in seen else None)
        if problem:
            skipped.append({"image_id": image_id, "reason": problem})
            continue
        seen.add((shard, key))
        if ext is None:
            skipped.append({"image_id": image_id, "reason": "no image member"})
            continue
        caption = caption_of(sample)
        samples.append({"key": key, "shard": shard, "member": f"{key}.{ext}", "sha256": sha256_bytes(sample[ext]),
                        "caption": None if caption is None else screen(caption, image_id)})
    for shard_path in shards:  # webdataset passes over links silently: list them, unread
        skipped += [{"image_id": f"{shard_path.relative_to(folder).as_posix()}/{name}", "reason": reason}
                    for name, reason in link_members(shard_path)]
    for entry in skipped:  # name the shard of a shard-level failure
        if not entry["image_id"]:
            entry["image_id"] = next((p.relative_to(folder).as_posix() for p in shards if str(p) in entry["reason"]),
                                     "shard")
    return samples, skipped


def link_members(shard: Path) -> list[tuple[str, str]]:
    """(name, reason) of the shard's symbolic- and hard-link members: never read (a link may point anywhere);
    an unreadable shard is webdataset's to report."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            return [(info.name, "a symbolic link member (not read)" if info.issym() else "a hard link member (not read)")
                    for info in tar if info.issym() or info.islnk()]
    except (tarfile.TarError, OSError):
        return []


def load(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Tar shards under prepare.folder named by the brace pattern prepare.shards. Damaged shards are
    listed, not fatal."""
    require_keys(cfg, role, "webdataset", "folder", "shards")
    folder = existing_folder(cfg, role)
    screen = CaptionScreen()
    samples, skipped = list_samples(folder, cfg.shards, screen)
    by_split: dict[str, list[ImageRow]] = {}
    for s in samples:
        by_split.setdefault(split_by_content(s["sha256"], cfg.test_fraction), []).append(
            ImageRow(f"{s['shard']}/{s['key']}", f"{s['shard']}/{s['member']}", s["sha256"],
                     [s["caption"]] if s["caption"] else []))
    splits = [Split(name, role.root, images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits) | {"skipped": {"count": len(skipped), "items": skipped}} | screen.report()
