"""webdataset tar shards as img2dataset writes them: listing samples, reading members in place.

A shard is `NNNNN.tar` holding, per sample, `{key}.jpg|png|webp` and `{key}.txt` and/or
`{key}.json` (a caption field); shard lists are brace patterns (`{00000..00127}.tar`) relative
to `prepare.folder`. Manifests name an image as `<shard>/<member>` (`00003.tar/000301.jpg`):
no absolute path, and extraction reads the member straight from the tar, never unpacking.
A truncated shard keeps the samples before the damage and lists the rest as skipped; a corrupt
member fails to decode at extraction and is listed like any unreadable image.
"""
from __future__ import annotations

import json
import tarfile
from functools import lru_cache
from pathlib import Path

from pipeline.errors import DatasetError
from pipeline.io import sha256_bytes

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


def caption_of(sample: dict) -> str | None:
    if sample.get("txt"):
        return sample["txt"].decode("utf-8", "replace").strip()
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        for name in CAPTION_FIELDS:
            if isinstance(meta, dict) and isinstance(meta.get(name), str) and meta[name].strip():
                return meta[name].strip()
    return None


def list_samples(folder: Path, pattern: str) -> tuple[list[dict], list[dict]]:
    """(samples, skipped): one dict per image member {"key", "member", "shard", "sha256", "caption"},
    in shard order; `skipped` lists damaged shards and samples without an image, with the reason."""
    import webdataset as wds

    samples, skipped = [], []

    def keep_going(exn: Exception) -> bool:  # a truncated or unreadable shard: list it, go on
        skipped.append({"image_id": "", "reason": f"{type(exn).__name__}: {exn}"})
        return True

    shards = shard_paths(folder, pattern)
    urls = [str(p) for p in shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, handler=keep_going, empty_check=False):
        shard = Path(sample["__url__"]).relative_to(folder).as_posix()
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            skipped.append({"image_id": f"{shard}/{sample['__key__']}", "reason": "no image member"})
            continue
        samples.append({"key": sample["__key__"], "shard": shard, "member": f"{sample['__key__']}.{ext}",
                        "sha256": sha256_bytes(sample[ext]), "caption": caption_of(sample)})
    for entry in skipped:  # name the shard of a shard-level failure
        if not entry["image_id"]:
            entry["image_id"] = next((p.relative_to(folder).as_posix() for p in shards if str(p) in entry["reason"]),
                                     "shard")
    return samples, skipped


# ---------------------------------------------------------------- reading a member in place
def split_member_path(path: Path) -> tuple[Path, str] | None:
    """`.../00003.tar/000301.jpg` -> (the shard, the member name); None for a plain file path."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].endswith(".tar"):
            return Path(*parts[:i]), "/".join(parts[i:])
    return None


@lru_cache(maxsize=8)
def _members(shard: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """An open shard and its member index; a truncated shard indexes the members before the damage."""
    tar = tarfile.open(shard, mode="r:")
    index = {}
    try:
        for info in tar:
            index[info.name] = info
    except (tarfile.TarError, OSError):
        pass
    return tar, index


def read_member(shard: Path, member: str) -> bytes:
    """The bytes of one member; FileNotFoundError when the shard or the member is not there."""
    if not shard.is_file():
        raise FileNotFoundError(f"shard {shard} not found")
    tar, index = _members(shard)
    info = index.get(member)
    if info is None:
        raise FileNotFoundError(f"{member} not in {shard.name} (or past its damaged end)")
    data = tar.extractfile(info).read()
    if len(data) != info.size:
        raise OSError(f"{member} in {shard.name} is truncated ({len(data)} of {info.size} bytes)")
    return data
