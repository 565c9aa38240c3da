"""Feature extraction: frozen vision tokens of every image of a split, written to the feature store.

The file's key hashes only what determines its content: the images' content hashes (in order), the
encoder's family, weights hash and preprocessing, the storage dtype and the format version -- never
a training or evaluation setting. Extraction is resumable: images are encoded in shards of
``shard_size``, each shard saved atomically under ``<key>.parts/``; an interrupted run skips finished
shards. Shards are encoded inline, or on a Dask cluster (a LocalCluster of N worker processes, or an
existing scheduler: several GPU machines), each a task that is retried on failure. The final file is
assembled from the shards in one deterministic pass (no timestamps), so a resumed or a distributed
run ends byte-identical to an uninterrupted inline one. The read side is pipeline.features.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline.encoders import VisionEncoder, load_encoder
from pipeline.errors import CacheError, ConfigError, DiskFullError
from pipeline.features import FeatureCache
from pipeline.images import load_image
from pipeline.io import atomic_path, sha256_json
from pipeline.manifest import ImageRow, Manifest
from pipeline.model_ids import model_id
from pipeline.runtime import keep_freed_memory

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: Fletcher-32 checksum per token chunk
BLOCK_SIZE = 256  # default images per resumable shard (the final file does not depend on it)
SHARD_RETRIES = 2  # a failed Dask shard is retried this many times before it is listed


def cache_key(manifest: Manifest, encoder: VisionEncoder, dtype: str) -> str:
    return sha256_json(
        {
            "format": FORMAT_VERSION,
            "images": [[r.image_id, r.image_sha256] for r in manifest.images],
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
        try:
            with FeatureCache(final) as hit:
                failed = hit.failed
            log.info("extract %s: cache hit %s (nothing encoded)", manifest.split, final.name)
            return ExtractResult(final, key, True, n, 0, failed)
        except CacheError as err:  # damaged after it was written: made again from the images
            log.warning("extract %s: %s; discarded, extracting it again", manifest.split, err)
            final.unlink()

    parts = features_dir / f"{key}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    blocks = [manifest.images[i : i + block_size] for i in range(0, n, block_size)]
    todo = [b for b in range(len(blocks)) if not _finished_block(_block_path(parts, b))]
    if len(todo) < len(blocks):
        log.info("extract %s: resuming, %d of %d blocks already done", manifest.split, len(blocks) - len(todo), len(blocks))
    start, encoded = time.perf_counter(), 0
    bar = tqdm(total=sum(len(blocks[b]) for b in todo), unit="img", desc=f"extract {manifest.split}")
    try:
        if cluster is not None:
            encoded = cluster.encode(blocks, todo, image_root, encoder, dtype, batch_size, parts, bar)
        else:
            for count, b in enumerate(todo):
                if stop_after_blocks is not None and count >= stop_after_blocks:
                    return ExtractResult(final, key, False, n, encoded, [], time.perf_counter() - start)
                _encode_block(blocks[b], image_root, encoder, dtype, batch_size, _block_path(parts, b), bar)
                encoded += len(blocks[b])
    finally:
        bar.close()  # now, not at exit: an error's one line is then the last one printed
    failed = _assemble(parts, len(blocks), final, key, manifest.split, encoder, dtype)
    shutil.rmtree(parts)
    return ExtractResult(final, key, False, n, encoded, failed, time.perf_counter() - start)


def _block_path(parts: Path, block: int) -> Path:
    return parts / f"block-{block:05d}.npz"


def _finished_block(path: Path) -> bool:
    """Whether a shard's part file is there and whole; a damaged one is discarded (said in the log), so
    its shard is encoded again."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as block:
            for name in ("ids", "tokens", "failed_ids", "reasons"):
                block[name]
        return True
    except Exception as err:  # zipfile, numpy and OS errors all mean: not a usable part
        log.warning("%s: damaged shard part (%s: %s); discarded, encoding its shard again",
                    path, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        path.unlink()
        return False


def _encode_block(rows, image_root, encoder, dtype, batch_size, out: Path, bar) -> None:
    ok_ids, tokens, failed_ids, reasons = [], [], [], []
    for i in range(0, len(rows), batch_size):
        images, ids = [], []
        for row in rows[i : i + batch_size]:
            path = image_root / row.image_path
            try:
                images.append(load_image(path))
                ids.append(row.image_id)
            except FileNotFoundError:
                failed_ids.append(row.image_id)
                reasons.append(f"missing file: {row.image_path}")
            except Exception as err:  # PIL raises many types for a corrupt file
                failed_ids.append(row.image_id)
                reasons.append(f"unreadable image {row.image_path}: {type(err).__name__}: {err}")
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
    """Shards encoded as Dask tasks: `workers` local processes, or the cluster at `scheduler` (a ``tls://``
    one with the `security` settings tls_security gives)."""

    def __init__(self, workers: int = 0, scheduler: str = "", security=None):
        from distributed import Client, LocalCluster

        if scheduler:
            self.cluster, self.client = None, Client(scheduler, security=security)
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        # Each worker computes with the torch thread count of an inline run here: CPU kernels may
        # split their sums differently with another count, and the file must be the same byte for byte.
        self.threads = torch.get_num_threads()

    def encode(self, blocks, todo, image_root, encoder, dtype, batch_size, parts, bar) -> int:
        """Encode shards `todo` into `parts`; retried, then listed in one error if they still fail. A part that
        does not fit on the disk is not retried: the run ends in the DiskFullError an inline run gives."""
        from distributed import as_completed

        # A fresh token per run: the client hands back a live future of the same key instead of submitting
        # it again, so a re-run in this process (after a failure) would otherwise get the old error back.
        run = uuid.uuid4().hex[:8]
        futures = {self.client.submit(encode_shard, encoder.spec, str(encoder.device), blocks[b], str(image_root),
                                      dtype, batch_size, str(_block_path(parts, b)), self.threads,
                                      key=f"extract-{parts.name}-{run}-{b}", retries=SHARD_RETRIES, pure=False): b
                   for b in todo}
        encoded, failed, disk_full = 0, [], []
        for future in as_completed(futures):
            b = futures[future]
            if future.status != "finished":
                err = future.exception()
                failed.append(f"shard {b} ({type(err).__name__}: {err})")
            elif isinstance(future.result(), str):  # its part did not fit on the disk
                disk_full.append((b, future.result()))
            else:
                encoded += len(blocks[b])
                bar.update(len(blocks[b]))
        if disk_full:  # the one line an inline run gives, naming the first part that did not fit
            raise DiskFullError(min(disk_full)[1])
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


def tls_security(scheduler: str, tls_ca_file: str = "", tls_cert: str = "", tls_key: str = ""):
    """Dask's security settings for the `extract.scheduler` address: None for ``tcp://``, and for
    ``tls://`` the CA that the scheduler's certificate must be signed by plus this machine's certificate
    and key (Dask's TLS is mutual: the scheduler checks the client too). Encryption is required, so no
    message can fall back to plain TCP. Anything missing or misplaced is one line naming the key."""
    given = {"tls_ca_file": tls_ca_file, "tls_cert": tls_cert, "tls_key": tls_key}
    if not scheduler.startswith("tls://"):
        if any(given.values()):
            raise ConfigError(f"extract.{', extract.'.join(k for k, v in given.items() if v)}: only used with a "
                              f"tls:// extract.scheduler, got {scheduler or 'none'!r}; clear them or use the "
                              "scheduler's tls:// address")
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError(f"extract.scheduler: {scheduler} is a TLS address, which needs extract.tls_ca_file, "
                          f"extract.tls_cert and extract.tls_key (empty: extract.{', extract.'.join(missing)}); "
                          "give the cluster's CA file and this machine's certificate and key")
    for name, path in given.items():
        if not Path(path).is_file():
            raise ConfigError(f"extract.{name}: {path}: no such file")
    from distributed.security import Security

    return Security(tls_ca_file=tls_ca_file, tls_client_cert=tls_cert, tls_client_key=tls_key,
                    require_encryption=True)


@lru_cache(maxsize=2)
def _worker_encoder(spec: str, device: str) -> VisionEncoder:
    return load_encoder(spec, torch.device(device))


def encode_shard(spec: str, device: str, rows: list[ImageRow], image_root: str, dtype: str, batch_size: int,
                 out: str, threads: int) -> int | str:
    """A Dask task: encode one shard into its part file (the encoder is loaded once per worker process).

    A full disk is returned as its one-line message rather than raised: a retry would encode the shard
    again only to fail the same way, and Dask would log each failure with its traceback."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    try:
        _encode_block(rows, Path(image_root), _worker_encoder(spec, device), dtype, batch_size, Path(out), None)
    except DiskFullError as err:
        return str(err)
    return len(rows)


def check_room(path: Path, data_bytes: int) -> None:
    """Stop before writing `path` when its filesystem lacks room for it: HDF5 left by a failed write
    can crash the process later, so the disk is checked first (atomic_path still catches a disk that
    fills meanwhile)."""
    needed = int(data_bytes * 1.02) + (1 << 20)  # chunk index and checksums, and a margin
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise DiskFullError(f"{path}: no space left on device for it ({needed / 1e6:.1f} MB needed, "
                            f"{free / 1e6:.1f} MB free; nothing was written); free space and run again "
                            "(finished work is kept)")


def _assemble(parts: Path, n_blocks: int, final: Path, key: str, split: str, encoder, dtype) -> list[dict]:
    blocks = [np.load(_block_path(parts, b)) for b in range(n_blocks)]
    shapes = [blk["tokens"].shape for blk in blocks if len(blk["ids"])]
    n_tokens, dim = shapes[0][1:] if shapes else (0, 0)
    n_ok = sum(s[0] for s in shapes)
    ids = [str(i) for blk in blocks for i in blk["ids"]]
    failed = [
        {"image_id": str(i), "reason": str(r)} for blk in blocks for i, r in zip(blk["failed_ids"], blk["reasons"])
    ]
    check_room(final, n_ok * n_tokens * dim * np.dtype(dtype).itemsize + sum(map(len, ids))
               + sum(len(f["image_id"]) + len(f["reason"]) for f in failed))
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
        f.attrs["encoder"] = model_id(encoder.spec)  # a Hub id or a name, never a machine path
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
