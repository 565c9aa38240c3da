"""Reading and decoding an image named by a manifest: a file, or a member of a tar shard
(`<shard>.tar/<member>`, read in place, never unpacked); and where such a path may point."""
from __future__ import annotations

import io
import tarfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


def path_problem(root: Path, rel: str) -> str | None:
    """Why `rel` may not name an image under `root`, or None: it is empty, holds a NUL byte (no file
    can be so named), is absolute, climbs out with `..`, or resolves (through a symlink) outside
    `root`. Checked before anything at the path is read."""
    parts = Path(rel).parts
    if not rel or not parts:
        return "an empty path"
    if "\x00" in rel:
        return "a path holding a NUL byte"
    if Path(rel).is_absolute():
        return "an absolute path"
    if ".." in parts:
        return "a path that climbs out with '..'"
    if not (root / rel).resolve().is_relative_to(Path(root).resolve()):
        return f"a symlink that leads out of {root}"
    return None


def member_problem(name: str) -> str | None:
    """Why a tar member's name may not be used as an image's name, or None (absolute, or with `..`)."""
    if "\x00" in name:
        return "a member name holding a NUL byte"
    if name.startswith("/") or Path(name).is_absolute():
        return "an absolute member name"
    if ".." in Path(name).parts:
        return "a member name that climbs out with '..'"
    return None


def split_member_path(path: Path) -> tuple[Path, str] | None:
    """`.../00003.tar/000301.jpg` -> (the shard, the member name); None for a plain file path."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].endswith(".tar"):
            return Path(*parts[:i]), "/".join(parts[i:])
    return None


_TARS = threading.Lock()  # held while a cached shard is indexed or read


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
    with _TARS:  # an open shard is shared (cached): one thread at a time seeks and reads in it
        tar, index = _members(shard)
        info = index.get(member)
        if info is None:
            raise FileNotFoundError(f"{member} not in {shard.name} (or past its damaged end)")
        data = tar.extractfile(info).read()
    if len(data) != info.size:
        raise OSError(f"{member} in {shard.name} is truncated ({len(data)} of {info.size} bytes)")
    return data


def read_image_bytes(path: Path) -> bytes:
    """The stored bytes of an image: a file, or a member of a tar shard."""
    member = split_member_path(path)
    return read_member(*member) if member else Path(path).read_bytes()


# Python's warning filters are one process-wide list that catch_warnings saves and restores: two threads
# inside it at once can restore each other's filters (a bomb would then be decoded, not refused). Only
# the opening, which reads the header and checks the size, is done under it, by one thread at a time.
_WARNINGS = threading.Lock()


def load_image(path: Path) -> Image.Image:
    """Decode an image to RGB; raises FileNotFoundError when it is not there, OSError/ValueError with
    the reason if unreadable. An image past Pillow's decompression-bomb limit (MAX_IMAGE_PIXELS, 89M
    pixels) is refused before it is decoded, as one too large to be a photo. Safe to call from several
    threads at once (the decoding itself runs in parallel: Pillow releases the GIL while it decodes)."""
    member = split_member_path(path)
    source = io.BytesIO(read_member(*member)) if member else path
    with _WARNINGS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(source)
    with img:  # decoded outside the lock: the size was checked on opening
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16-bit, 32-bit and float pixels to 0..255, which turns a
    16-bit scan white: those are scaled instead (16-bit to 8 by 1/257; float taken as 0..1). Alpha is
    dropped, as image processors do; palette, CMYK, LA and 1-bit convert as Pillow does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        elif img.mode.startswith("I;16") or np.max(values, initial=0) > 255:
            values = values / 257.0
        img = Image.fromarray(np.nan_to_num(values).clip(0, 255).round().astype(np.uint8))  # 2-D: mode L
    return img.convert("RGB")
