"""Feature extraction: frozen vision tokens of every image of a split, written to the feature store.

The file's key hashes only what determines its content: the images' content hashes (in order), the
encoder's family, weights hash and preprocessing, the storage dtype and the format version -- never
a training or evaluation setting. Extraction is resumable: images are encoded in shards of
``shard_size``, each shard saved atomically under ``<key>.parts/``; an interrupted run skips finished
shards. Shards are encoded inline, or on a Dask cluster (a LocalCluster of N worker processes, or an
existing scheduler: several GPU machines), each a task that is retried on failure; each worker picks its
own device (worker_device) and torch thread count (worker_threads). Within a shard, images are decoded
and preprocessed by a thread pool (`decode_workers`) a few batches ahead of the encoder's forward. The
final file is assembled from the shards in one deterministic pass (no timestamps), so a resumed or a
distributed run ends byte-identical to an uninterrupted inline one. The read side is pipeline.features.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from PIL import Image
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
DECODE_WORKERS = 0  # default threads decoding images (extract.decode_workers); 0: in the encoding thread
PREFETCH_BATCHES = 2  # batches decoded and preprocessed ahead of the one being encoded
# Extraction never computes on one torch thread, inline or on a Dask worker: single-threaded, ATen runs 1x1
# convolutions of batches under 16 with its own kernel instead of oneDNN's (EfficientNet-Lite0's tokens then
# differ in float16 from a multi-threaded run's), while oneDNN's results did not change from 2 to 16 threads.
MIN_WORKER_THREADS = 2


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
    decode_workers: int = DECODE_WORKERS,
) -> ExtractResult:
    """Encode every image of `manifest` into ``features_dir/<key>.h5`` (or reuse it).

    `cluster` encodes the shards on Dask workers instead of inline. `decode_workers` threads decode and
    preprocess the next batches while the encoder runs (0: one image after another, in this thread);
    the file does not depend on it. `stop_after_blocks` ends
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
            encoded = cluster.encode(blocks, todo, image_root, encoder, dtype, batch_size, parts, bar,
                                     decode_workers)
        else:
            now = todo if stop_after_blocks is None else todo[:stop_after_blocks]
            _encode_blocks([(blocks[b], _block_path(parts, b)) for b in now], image_root, encoder, dtype, batch_size,
                           bar, decode_workers)
            encoded = sum(len(blocks[b]) for b in now)
            if len(now) < len(todo):
                return ExtractResult(final, key, False, n, encoded, [], time.perf_counter() - start)
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


def _decode(image_root: Path, row: ImageRow) -> tuple[Image.Image | None, str | None]:
    """One image decoded to RGB, or None and the reason it is skipped."""
    path = image_root / row.image_path
    try:
        return load_image(path), None
    except FileNotFoundError:
        return None, f"missing file: {row.image_path}"
    except Exception as err:  # PIL raises many types for a corrupt file
        return None, f"unreadable image {row.image_path}: {type(err).__name__}: {err}"


@dataclass
class _Batch:
    size: int  # rows of the manifest it covers
    ids: list[str]  # of the images decoded, in manifest order
    pixels: torch.Tensor | None  # their preprocessed pixels; None when none decoded
    failed: list[tuple[str, str]]  # (image_id, reason), in manifest order


def _prepare(rows: list[ImageRow], decoded: list, encoder: VisionEncoder) -> _Batch:
    ids = [row.image_id for row, (image, _) in zip(rows, decoded) if image is not None]
    failed = [(row.image_id, reason) for row, (image, reason) in zip(rows, decoded) if image is None]
    images = [image for image, _ in decoded if image is not None]
    pixels = encoder.preprocess(images) if images else None
    if pixels is not None and encoder.device.type == "cuda":  # pinned here, off the encoding thread
        pixels = pixels.pin_memory()
    return _Batch(len(rows), ids, pixels, failed)


def _batches(spans, image_root: Path, encoder: VisionEncoder, decode_workers: int):
    """Each of `spans` (lists of rows) decoded and preprocessed, in order. With `decode_workers`, a pool
    decodes the images (Pillow releases the GIL while it decodes) and one more thread preprocesses each
    batch, up to PREFETCH_BATCHES ahead of the batch the caller is encoding; the same images in the same
    order reach the same preprocess call, so the tokens are those of decoding in this thread."""
    if decode_workers <= 0:
        for span in spans:
            yield _prepare(span, [_decode(image_root, row) for row in span], encoder)
        return
    pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
    collate = ThreadPoolExecutor(1, thread_name_prefix="preprocess")

    def collect(span, futures) -> _Batch:
        return _prepare(span, [future.result() for future in futures], encoder)

    try:
        pending = deque()
        for span in spans:
            pending.append(collate.submit(collect, span, [pool.submit(_decode, image_root, row) for row in span]))
            if len(pending) > PREFETCH_BATCHES:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the caller stops early (an error): queued decoding is dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
        collate.shutdown(wait=True, cancel_futures=True)


def _encode_blocks(work, image_root, encoder, dtype, batch_size, bar, decode_workers: int = 0) -> None:
    """Encode each shard of `work` ((rows, part file) pairs) into its part file, in order; each part is saved
    as soon as its last batch is encoded. Decoding runs on ahead across the shards' boundaries."""
    spans = [(w, rows[i : i + batch_size]) for w, (rows, _) in enumerate(work) for i in range(0, len(rows), batch_size)]
    left = [len(range(0, len(rows), batch_size)) for rows, _ in work]  # batches still to encode, per shard
    for w, (_, out) in enumerate(work):
        if not left[w]:
            _save_part(out, [], [], [], [], dtype)
    ok_ids, tokens, failed_ids, reasons = [], [], [], []
    with closing(_batches([span for _, span in spans], image_root, encoder, decode_workers)) as batches, \
            _encoding_threads(encoder):
        for (w, _), batch in zip(spans, batches):
            for image_id, reason in batch.failed:
                failed_ids.append(image_id)
                reasons.append(reason)
            if batch.pixels is not None:
                tokens.append(encoder.encode_pixels(batch.pixels).cpu().numpy().astype(dtype))  # (b, N, d_v)
                ok_ids.extend(batch.ids)
            if bar is not None:
                bar.update(batch.size)
            left[w] -= 1
            if not left[w]:
                _save_part(work[w][1], ok_ids, tokens, failed_ids, reasons, dtype)
                ok_ids, tokens, failed_ids, reasons = [], [], [], []


@contextmanager
def _encoding_threads(encoder: VisionEncoder) -> Iterator[None]:
    """At least MIN_WORKER_THREADS torch threads while a CPU encoder runs: on one thread torch picks other
    convolution kernels for small batches, and other bytes, so a process that runs on one thread (a test
    session, a one-core machine, a Dask worker given one core) would write other features than one on two."""
    before = torch.get_num_threads()
    if encoder.device.type == "cpu" and before < MIN_WORKER_THREADS:
        torch.set_num_threads(MIN_WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _save_part(out: Path, ok_ids, tokens, failed_ids, reasons, dtype) -> None:
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
    one with the `security` settings tls_security gives).

    `device` (extract.device: auto, cpu, cuda or cuda:N) is resolved by each worker on its own machine
    (worker_device): auto and cuda spread local worker k over its GPUs; None follows the type of the
    driver's encoder device. Each worker runs its machine's cores // its workers there torch threads (at
    least MIN_WORKER_THREADS)."""

    def __init__(self, workers: int = 0, scheduler: str = "", security=None, device: str | None = None):
        from distributed import Client, LocalCluster

        if scheduler:
            self.cluster, self.client = None, Client(scheduler, security=security)
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        self.device = device

    def encode(self, blocks, todo, image_root, encoder, dtype, batch_size, parts, bar,
               decode_workers: int = DECODE_WORKERS) -> int:
        """Encode shards `todo` into `parts`; retried, then listed in one error if they still fail. A part that
        does not fit on the disk is not retried: the run ends in the DiskFullError an inline run gives."""
        from distributed import as_completed

        # A fresh token per run: the client hands back a live future of the same key instead of submitting
        # it again, so a re-run in this process (after a failure) would otherwise get the old error back.
        run = uuid.uuid4().hex[:8]
        device = self.device or encoder.device.type
        hosts = self.workers_per_host()
        futures = {self.client.submit(encode_shard, encoder.spec, device, blocks[b], str(image_root), dtype,
                                      batch_size, str(_block_path(parts, b)), hosts, decode_workers,
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

    def workers_per_host(self) -> dict[str, int]:
        """How many of the cluster's workers run on each host (each splits that machine's cores)."""
        from distributed.comm import get_address_host

        counts: dict[str, int] = {}
        for address in self.client.scheduler_info(n_workers=-1)["workers"]:
            host = get_address_host(address)
            counts[host] = counts.get(host, 0) + 1
        return counts

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


def worker_device(index: int | None, spec: str, device_count: int) -> str:
    """The device of a Dask worker: `spec` is extract.device, `index` the worker's number on its machine
    (a LocalCluster's worker k; None when its name is not a number), `device_count` its machine's GPUs.
    auto uses the GPUs when there are any, else the CPU; auto and cuda put worker k on cuda:(k mod
    device_count), or on cuda (the device its launcher made current) without a number; cpu and cuda:N
    are kept as given."""
    if spec == "auto":
        spec = "cuda" if device_count > 0 else "cpu"
    if spec != "cuda":
        return spec
    if device_count <= 0:
        raise ConfigError("extract.device: 'cuda' requested but a Dask worker's machine has no CUDA device")
    return "cuda" if index is None else f"cuda:{index % device_count}"


def worker_threads(cores: int, workers_on_host: int) -> int:
    """Torch threads of one Dask worker: its machine's cores shared among the workers there, but at least
    MIN_WORKER_THREADS."""
    return max(MIN_WORKER_THREADS, cores // max(1, workers_on_host))


def _worker_index(name) -> int | None:
    """A worker's number from its name: a LocalCluster names its workers 0..N-1; `dask worker --name 3`."""
    if isinstance(name, int):
        return name
    return int(name) if isinstance(name, str) and name.isdecimal() else None


@lru_cache(maxsize=2)
def _worker_encoder(spec: str, device: str) -> VisionEncoder:
    return load_encoder(spec, torch.device(device))


def encode_shard(spec: str, device: str, rows: list[ImageRow], image_root: str, dtype: str, batch_size: int,
                 out: str, hosts: dict[str, int], decode_workers: int = DECODE_WORKERS) -> int | str:
    """A Dask task: encode one shard into its part file (the encoder is loaded once per worker process).

    `device` is extract.device, resolved here on the worker's machine (worker_device); `hosts` counts the
    cluster's workers on each host, so that the workers of one machine share its cores. A full disk is
    returned as its one-line message rather than raised: a retry would encode the shard again only to fail
    the same way, and Dask would log each failure with its traceback."""
    from distributed import get_worker
    from distributed.comm import get_address_host

    keep_freed_memory()
    worker = get_worker()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(worker_threads(cores, hosts.get(get_address_host(worker.address), 1)))
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    encoder = _worker_encoder(spec, worker_device(_worker_index(worker.name), device, gpus))
    try:
        _encode_blocks([(rows, Path(out))], Path(image_root), encoder, dtype, batch_size, None, decode_workers)
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
