"""Writes small webdataset shards exactly as img2dataset lays them out (for tests)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    tar.addfile(info, io.BytesIO(payload))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, Image.Image | bytes, str, str]]) -> None:
    """samples: (key, image or raw bytes, caption, "txt" | "json" | "both"); images as {key}.jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, caption, how in samples:
            add(tar, f"{key}.jpg", image if isinstance(image, bytes) else png_bytes(image, "JPEG"))
            if how in ("txt", "both"):
                add(tar, f"{key}.txt", caption.encode())
            if how in ("json", "both"):
                add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}).encode())


def truncate(path: Path, member: str) -> None:
    """Cut the shard in the middle of `member`'s data, as an interrupted download would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])
