"""Parallel decoding and per-worker devices in extraction: the feature file does not depend on the decode
threads (inline or on 2 local Dask workers), skipped images keep their reasons, and each worker's device
and thread count are chosen on the worker."""
from __future__ import annotations

import dataclasses
import filecmp
import os
import shutil

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.extraction import (ShardCluster, _worker_index, extract_split, worker_device,
                                 worker_threads)
from pipeline.features import FeatureCache
from pipeline.manifest import Manifest
from tests.test_extract import png_claiming


@pytest.mark.parametrize("index, spec, count, device", [
    (0, "auto", 0, "cpu"), (3, "auto", 0, "cpu"),  # no GPU: every worker on the CPU
    (0, "auto", 2, "cuda:0"), (1, "auto", 2, "cuda:1"), (2, "auto", 2, "cuda:0"), (5, "auto", 4, "cuda:1"),
    (3, "cuda", 8, "cuda:3"), (7, "cuda", 1, "cuda:0"),
    (None, "auto", 4, "cuda"), (None, "cuda", 2, "cuda"),  # a worker without a number: its current device
    (1, "cpu", 4, "cpu"), (1, "cuda:2", 4, "cuda:2"),  # given outright: kept
])
def test_worker_device(index, spec, count, device):
    assert worker_device(index, spec, count) == device


def test_worker_device_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match="extract.device: 'cuda' requested"):
        worker_device(0, "cuda", 0)


def test_worker_threads_and_index():
    assert [worker_threads(16, n) for n in (1, 2, 3, 4, 8, 16, 32)] == [16, 8, 5, 4, 2, 2, 2]
    assert worker_threads(4, 0) == 4 and worker_threads(1, 1) == 2  # never one thread: another conv kernel
    assert [_worker_index(n) for n in (0, 3, "2", "w0", "tcp://127.0.0.1:4000", None)] == [0, 3, 2, None, None, None]


def distinct(manifest32, copies: int) -> Manifest:
    rows = [dataclasses.replace(r, image_id=f"{r.image_id}-{k}") for k, r in enumerate(manifest32.images * copies)]
    return Manifest("train", manifest32.image_root, rows)


@pytest.fixture
def with_bad_images(manifest32, easyvqa_root, tmp_path):
    """32 good images with missing, corrupt, truncated, empty and decompression-bomb files among them."""
    root = tmp_path / "images"
    rows = []
    for k, row in enumerate(manifest32.images):
        dst = root / row.image_path
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(easyvqa_root / row.image_path, dst)
        rows.append(row)
        if k % 4 == 1:
            bad = {0: b"", 1: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10, 2: png_claiming(20_000, 20_000),
                   3: png_claiming(10_000, 10_000), 4: dst.read_bytes()[:200]}.get(k // 4 % 6)
            name = f"bad/{k}.png"
            if bad is not None:  # else missing
                (root / "bad").mkdir(exist_ok=True)
                (root / name).write_bytes(bad)
            rows.append(dataclasses.replace(row, image_id=f"bad-{k}", image_path=name))
    return Manifest("train", manifest32.image_root, rows), root


def test_decode_threads_give_the_same_file_and_the_same_skipped_reasons(with_bad_images, lite0, tmp_path):
    manifest, root = with_bad_images
    serial = extract_split(manifest, root, lite0, tmp_path / "serial", batch_size=8, block_size=16, decode_workers=0)
    threaded = extract_split(manifest, root, lite0, tmp_path / "threads", batch_size=8, block_size=16,
                             decode_workers=4)
    assert threaded.key == serial.key and threaded.n_encoded == serial.n_encoded == len(manifest.images)
    assert filecmp.cmp(serial.path, threaded.path, shallow=False)
    assert threaded.failed == serial.failed  # same images, same reasons, same order
    reasons = {f["image_id"]: f["reason"] for f in threaded.failed}
    assert len(reasons) == 8 and all(i.startswith("bad-") for i in reasons)
    missing = [i for i, r in reasons.items() if r.startswith("missing file: bad/")]
    assert len(missing) == 1
    assert all(r.startswith(f"unreadable image bad/{i[4:]}.png: ") for i, r in reasons.items() if i not in missing)
    assert sum("DecompressionBomb" in r for r in reasons.values()) == 2  # refused in any thread
    with FeatureCache(threaded.path) as cache:
        assert cache.ids == [r.image_id for r in manifest.images if r.image_id not in reasons]


def test_two_dask_workers_with_decode_threads_give_the_inline_file_byte_for_byte(manifest32, easyvqa_root, lite0,
                                                                                 tmp_path):
    manifest = distinct(manifest32, 2)  # 64 images, 4 shards
    inline = extract_split(manifest, easyvqa_root, lite0, tmp_path / "inline", batch_size=8, block_size=16,
                           decode_workers=0)
    with ShardCluster(workers=2) as cluster:
        sharded = extract_split(manifest, easyvqa_root, lite0, tmp_path / "dask", batch_size=8, block_size=16,
                                cluster=cluster, decode_workers=3)
        threads = cluster.client.run(torch.get_num_threads)  # worker address -> its torch threads
    assert sharded.n_encoded == 64 and sharded.key == inline.key
    assert filecmp.cmp(inline.path, sharded.path, shallow=False)
    assert sorted(threads.values()) == [worker_threads(len(os.sched_getaffinity(0)), 2)] * 2
