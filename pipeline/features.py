"""The feature store's read side: the HDF5 files the extract stage writes (pipeline.extraction).

A cache file ``<key>.h5`` holds, for one split, ``tokens`` (n x N x d_v, float16 by default, one
chunk per sample, each with a Fletcher-32 checksum so a corrupted chunk fails on read instead of
being trained on), ``image_ids`` and the images that could not be read (``failed_ids``,
``failed_reasons``); ``index.json`` names the file of each split. Training and evaluation read
only here: they never import extraction code.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import CacheError, MissingInputError

def features_file(features_dir: Path, split: str) -> Path:
    """The cache file the extract stage recorded for `split` in index.json."""
    index = Path(features_dir) / "index.json"
    if not index.exists():
        raise MissingInputError(f"{index}: not found (run the extract stage first)")
    try:
        entry = json.loads(index.read_text()).get(split)
        if entry is None:
            raise MissingInputError(f"{index}: no features for split {split!r}")
        return Path(features_dir) / entry["file"]
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise CacheError(f"{index}: damaged feature index ({type(err).__name__}: {err}); "
                         "run the extract stage again (dvc repro -f extract)") from None


def read_token_rows(file: h5py.File, path: Path, rows: np.ndarray) -> np.ndarray:
    """(len(rows), N, d_v) tokens of the given rows, in that order (repeats allowed), reading only those.

    Dense requests are one contiguous read of their span (far faster than h5py's point
    selection); sparse ones (a random training batch of a large split) read one chunk per
    distinct row, so memory stays bounded by the request, never by the split. A chunk whose
    Fletcher-32 checksum fails stops with one line naming the file and the sample.
    """
    data = file["tokens"]
    rows = np.asarray(rows, dtype=np.int64)
    distinct, inverse = np.unique(rows, return_inverse=True)
    if len(distinct) == 0:
        return np.empty((0,) + data.shape[1:], data.dtype)
    try:
        if distinct[-1] - distinct[0] + 1 <= 2 * len(distinct):
            block = data[distinct[0] : distinct[-1] + 1][distinct - distinct[0]]
        else:
            block = np.stack([data[r] for r in distinct])
    except OSError as err:  # checksum mismatch or an unreadable chunk
        bad = next((int(r) for r in distinct if not _readable(data, int(r))), int(distinct[0]))
        sample = file["image_ids"][bad].decode()
        raise CacheError(f"{path}: sample {sample!r} (row {bad}) is corrupt ({err}); delete the file and re-run "
                         f"the extract stage") from None
    return block[inverse.reshape(-1)]


def _readable(data: h5py.Dataset, row: int) -> bool:
    try:
        data[row]
        return True
    except OSError:
        return False


class TokenReader:
    """Reads token rows of one cache file, kept open, without loading its list of ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise CacheError(f"{self.path}: not a readable feature cache ({err})") from None

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        return read_token_rows(self.file, self.path, rows)


class FeatureCache:
    """Read side of a cache file: ids, tokens by id, provenance attributes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise MissingInputError(f"{self.path}: feature cache not found (run the extract stage first)")
        try:
            self.file = h5py.File(self.path, "r")
            self.ids = [s.decode() for s in self.file["image_ids"][:]]
        except (OSError, KeyError) as err:
            raise CacheError(f"{self.path}: not a readable feature cache ({err}); "
                             "run the extract stage again (dvc repro -f extract)") from None
        self.index = {image_id: i for i, image_id in enumerate(self.ids)}

    @property
    def attrs(self) -> dict:
        return dict(self.file.attrs)

    @property
    def failed(self) -> list[dict]:
        return [
            {"image_id": i.decode(), "reason": r.decode()}
            for i, r in zip(self.file["failed_ids"][:], self.file["failed_reasons"][:])
        ]

    def rows(self, image_ids: list[str]) -> np.ndarray:
        """The cache row of each id (int64)."""
        return np.array([self.index[i] for i in image_ids], dtype=np.int64)

    def tokens(self, image_ids: list[str] | None = None) -> np.ndarray:
        """(n, N, d_v) in the stored dtype, in the order of `image_ids` (repeats allowed; all when None)."""
        return self.read_rows(np.arange(len(self.ids)) if image_ids is None else self.rows(image_ids))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), N, d_v) in the given order (repeats allowed); see `read_token_rows`."""
        return read_token_rows(self.file, self.path, rows)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
