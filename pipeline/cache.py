"""Content-keyed HDF5 cache of frozen vision tokens.

A cache file ``<key>.h5`` holds, for one split, ``tokens`` (n x N x d_v,
float16 by default, one chunk per sample, each with a Fletcher-32 checksum so a
corrupted chunk fails on read instead of being trained on), ``image_ids`` and the images that
could not be read (``failed_ids``, ``failed_reasons``). The key hashes only what
determines the content: the images' content hashes (in order), the encoder's
family, weights hash and preprocessing, the storage dtype and the format
version -- never a training or evaluation setting.

Extraction is resumable: images are encoded in shards of ``shard_size``, each shard saved
atomically under ``<key>.parts/``; an interrupted run skips finished shards. Shards are
encoded inline, or on a Dask cluster (a LocalCluster of N worker processes, or an existing
scheduler: several GPU machines), each a task that is retried on failure. The final file is
assembled from the shards in one deterministic pass (no timestamps), so a resumed or a
distributed run ends byte-identical to an uninterrupted inline one.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Manifest, load_image
from pipeline.encoders import VisionEncoder, load_encoder
from pipeline.errors import CacheError, MissingInputError
from pipeline.io import atomic_path, sha256_json
from pipeline.runtime import keep_freed_memory

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: Fletcher-32 checksum per token chunk
BLOCK_SIZE = 256  # default images per resumable shard (the final file does not depend on it)
SHARD_RETRIES = 2  # a failed Dask shard is retried this many times before it is listed


def cache_key(manifest: Manifest, encoder: VisionEncoder, dtype: str) -> str:
    return sha256_json(
        {
            "format": FORMAT_VERSION,
            "images": [[r["image_id"], r["image_sha256"]] for r in manifest.images],
            "encoder": {"weights_sha256": encoder.weights_sha256, "preprocessing": encoder.preprocessing},
            "dtype": dtype,
        }
    )


@dataclass
class ExtractResult:
    path: Path
    key: str
    hit: bool
    n_images: int
    n_encoded: int  # encoded in this run (0 on a hit)
    failed: list[dict] = field(default_factory=list)  # {"image_id", "reason"}
    seconds: float = 0.0


def extract_split(
    manifest: Manifest,
    image_root: Path,
    encoder: VisionEncoder,
    features_dir: Path,
    dtype: str = "float16",
    batch_size: int = 64,
    block_size: int = BLOCK_SIZE,
    stop_after_blocks: int | None = None,
    cluster: "ShardCluster | None" = None,
) -> ExtractResult:
    """Encode every image of `manifest` into ``features_dir/<key>.h5`` (or reuse it).

    `cluster` encodes the shards on Dask workers instead of inline. `stop_after_blocks` ends
    the run early after that many shards, leaving the parts behind as an interruption would
    (used to test resuming).
    """
    features_dir = Path(features_dir)
    key = cache_key(manifest, encoder, dtype)
    final = features_dir / f"{key}.h5"
    n = len(manifest.images)
    if final.exists():
        with FeatureCache(final) as hit:
            failed = hit.failed
        log.info("extract %s: cache hit %s (nothing encoded)", manifest.split, final.name)
        return ExtractResult(final, key, True, n, 0, failed)

    parts = features_dir / f"{key}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    blocks = [manifest.images[i : i + block_size] for i in range(0, n, block_size)]
    todo = [b for b in range(len(blocks)) if not _block_path(parts, b).exists()]
    if len(todo) < len(blocks):
        log.info("extract %s: resuming, %d of %d blocks already done", manifest.split, len(blocks) - len(todo), len(blocks))
    start, encoded = time.perf_counter(), 0
    bar = tqdm(total=sum(len(blocks[b]) for b in todo), unit="img", desc=f"extract {manifest.split}")
    if cluster is not None:
        encoded = cluster.encode(blocks, todo, image_root, encoder, dtype, batch_size, parts, bar)
    else:
        for count, b in enumerate(todo):
            if stop_after_blocks is not None and count >= stop_after_blocks:
                bar.close()
                return ExtractResult(final, key, False, n, encoded, [], time.perf_counter() - start)
            _encode_block(blocks[b], image_root, encoder, dtype, batch_size, _block_path(parts, b), bar)
            encoded += len(blocks[b])
    bar.close()
    failed = _assemble(parts, len(blocks), final, key, manifest.split, encoder, dtype)
    shutil.rmtree(parts)
    return ExtractResult(final, key, False, n, encoded, failed, time.perf_counter() - start)


def _block_path(parts: Path, block: int) -> Path:
    return parts / f"block-{block:05d}.npz"


def _encode_block(rows, image_root, encoder, dtype, batch_size, out: Path, bar) -> None:
    ok_ids, tokens, failed_ids, reasons = [], [], [], []
    for i in range(0, len(rows), batch_size):
        images, ids = [], []
        for row in rows[i : i + batch_size]:
            path = image_root / row["image_path"]
            try:
                images.append(load_image(path))
                ids.append(row["image_id"])
            except FileNotFoundError:
                failed_ids.append(row["image_id"])
                reasons.append(f"missing file: {row['image_path']}")
            except Exception as err:  # PIL raises many types for a corrupt file
                failed_ids.append(row["image_id"])
                reasons.append(f"unreadable image {row['image_path']}: {type(err).__name__}: {err}")
        if images:
            tokens.append(encoder.encode(images).cpu().numpy().astype(dtype))  # (b, N, d_v)
            ok_ids.extend(ids)
        if bar is not None:
            bar.update(len(rows[i : i + batch_size]))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                tokens=np.concatenate(tokens) if tokens else np.zeros((0, 0, 0), dtype),
                ids=np.array(ok_ids, dtype=str),
                failed_ids=np.array(failed_ids, dtype=str),
                reasons=np.array(reasons, dtype=str),
            )


class ShardCluster:
    """Shards encoded as Dask tasks: `workers` local processes, or the cluster at `scheduler`."""

    def __init__(self, workers: int = 0, scheduler: str = ""):
        from distributed import Client, LocalCluster

        if scheduler:
            self.cluster, self.client = None, Client(scheduler)
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        # Each worker computes with the torch thread count of an inline run here: CPU kernels may
        # split their sums differently with another count, and the file must be the same byte for byte.
        self.threads = torch.get_num_threads()

    def encode(self, blocks, todo, image_root, encoder, dtype, batch_size, parts, bar) -> int:
        """Encode shards `todo` into `parts`; retried, then listed in one error if they still fail."""
        from distributed import as_completed

        futures = {self.client.submit(encode_shard, encoder.spec, str(encoder.device), blocks[b], str(image_root),
                                      dtype, batch_size, str(_block_path(parts, b)), self.threads,
                                      key=f"extract-{parts.name}-{b}", retries=SHARD_RETRIES, pure=False): b
                   for b in todo}
        encoded, failed = 0, []
        for future in as_completed(futures):
            b = futures[future]
            if future.status == "finished":
                encoded += len(blocks[b])
                bar.update(len(blocks[b]))
            else:
                err = future.exception()
                failed.append(f"shard {b} ({type(err).__name__}: {err})")
        if failed:
            raise CacheError(f"{parts}: {len(failed)} of {len(todo)} shards failed after {SHARD_RETRIES} retries: "
                             f"{'; '.join(sorted(failed))}; finished shards are kept, re-run to resume")
        return encoded

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "ShardCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@lru_cache(maxsize=2)
def _worker_encoder(spec: str, device: str) -> VisionEncoder:
    return load_encoder(spec, torch.device(device))


def encode_shard(spec: str, device: str, rows: list[dict], image_root: str, dtype: str, batch_size: int,
                 out: str, threads: int) -> int:
    """A Dask task: encode one shard into its part file (the encoder is loaded once per worker process)."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    _encode_block(rows, Path(image_root), _worker_encoder(spec, device), dtype, batch_size, Path(out), None)
    return len(rows)


def _assemble(parts: Path, n_blocks: int, final: Path, key: str, split: str, encoder, dtype) -> list[dict]:
    blocks = [np.load(_block_path(parts, b)) for b in range(n_blocks)]
    shapes = [blk["tokens"].shape for blk in blocks if len(blk["ids"])]
    n_tokens, dim = shapes[0][1:] if shapes else (0, 0)
    n_ok = sum(s[0] for s in shapes)
    ids = [str(i) for blk in blocks for i in blk["ids"]]
    failed = [
        {"image_id": str(i), "reason": str(r)} for blk in blocks for i, r in zip(blk["failed_ids"], blk["reasons"])
    ]
    string = h5py.string_dtype()
    with atomic_path(final) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        dset = f.create_dataset(
            "tokens", shape=(n_ok, n_tokens, dim), dtype=dtype, chunks=(1, n_tokens, dim) if n_ok else None,
            fletcher32=bool(n_ok), track_times=False,
        )
        row = 0
        for blk in blocks:
            if len(blk["ids"]):
                dset[row : row + len(blk["ids"])] = blk["tokens"]
                row += len(blk["ids"])
        f.create_dataset("image_ids", data=np.array(ids, dtype=object), dtype=string, track_times=False)
        f.create_dataset("failed_ids", data=np.array([x["image_id"] for x in failed], dtype=object), dtype=string,
                         track_times=False)
        f.create_dataset("failed_reasons", data=np.array([x["reason"] for x in failed], dtype=object), dtype=string,
                         track_times=False)
        f.attrs["cache_key"] = key
        f.attrs["split"] = split
        f.attrs["encoder"] = encoder.spec if not encoder.spec.startswith("hf:") else "hf"
        f.attrs["encoder_weights_sha256"] = encoder.weights_sha256
        f.attrs["preprocessing"] = json.dumps(encoder.preprocessing, sort_keys=True)
        f.attrs["dtype"] = dtype
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["library_versions"] = json.dumps(_library_versions(), sort_keys=True)
    return failed


def _library_versions() -> dict[str, str]:
    import PIL
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "h5py": h5py.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def features_file(features_dir: Path, split: str) -> Path:
    """The cache file the extract stage recorded for `split` in index.json."""
    index = Path(features_dir) / "index.json"
    if not index.exists():
        raise MissingInputError(f"{index}: not found (run the extract stage first)")
    entry = json.loads(index.read_text()).get(split)
    if entry is None:
        raise MissingInputError(f"{index}: no features for split {split!r}")
    return Path(features_dir) / entry["file"]


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
            raise CacheError(f"{self.path}: not a readable feature cache ({err})") from None
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
