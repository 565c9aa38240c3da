"""Extraction on a real Dask cluster the test starts (`dask scheduler`, `dask worker` processes, reached
through `extract.scheduler`'s path): a worker killed with SIGKILL in the middle of a shard, and a shard
that fails on every try."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import CacheError
from pipeline.extraction import ShardCluster, extract_split
from pipeline.manifest import Manifest

pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).with_name("dask"))


@pytest.fixture
def cluster(tmp_path):
    """A scheduler and two single-thread workers without nannies (a killed worker stays dead)."""
    address_file = tmp_path / "scheduler.json"
    env = os.environ | {"DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(address_file)], env=env, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(address_file.read_text())["address"]
        workers = [subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                     "--name", f"w{i}"], env=env, stderr=subprocess.DEVNULL) for i in range(2)]
        yield address
    finally:
        for proc in workers + [scheduler]:
            proc.kill()
            proc.wait()


def distinct(manifest32, copies: int = 2) -> Manifest:
    rows = [dataclasses.replace(r, image_id=f"{r.image_id}-{k}") for k, r in enumerate(manifest32.images * copies)]
    return Manifest("train", manifest32.image_root, rows)


def test_a_worker_killed_mid_shard_gives_the_inline_file_byte_for_byte(cluster, manifest32, easyvqa_root, lite0,
                                                                      tmp_path):
    manifest = distinct(manifest32)  # 64 images, 8 shards
    inline = extract_split(manifest, easyvqa_root, lite0, tmp_path / "inline", batch_size=8, block_size=8)
    killed = []
    with ShardCluster(scheduler=cluster) as shards:
        client = shards.client
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)  # worker address -> its process id

        def kill_a_busy_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy and len(client.scheduler_info()["workers"]) == 2:
                    time.sleep(0.5)  # well inside the shard (one takes seconds)
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        sharded = extract_split(manifest, easyvqa_root, lite0, tmp_path / "dask", batch_size=8, block_size=8,
                                cluster=shards)
        killer.join()
        assert killed and len(client.scheduler_info()["workers"]) == 1  # one worker died, the other went on
    assert sharded.n_encoded == 64
    assert filecmp.cmp(inline.path, sharded.path, shallow=False)


def test_a_shard_that_fails_on_every_try_is_listed_and_the_rest_are_kept(cluster, manifest32, easyvqa_root,
                                                                          lite0, tmp_path):
    manifest = distinct(manifest32, copies=1)  # 32 images, 4 shards
    features = tmp_path / "features"
    with ShardCluster(scheduler=cluster) as shards:
        # shard 2's part cannot be written: a folder stands where its file goes (the rename fails every try)
        probe = extract_split(manifest, easyvqa_root, lite0, tmp_path / "probe", batch_size=8, block_size=8,
                              stop_after_blocks=0)
        blocked = features / f"{probe.key}.parts" / "block-00002.npz"
        (blocked / "in-the-way").mkdir(parents=True)
        with pytest.raises(CacheError) as err:
            extract_split(manifest, easyvqa_root, lite0, features, batch_size=8, block_size=8, cluster=shards)
    text = str(err.value)
    assert "1 of 4 shards failed after 2 retries: shard 2 (" in text and "finished shards are kept" in text
    assert "\n" not in text
    assert sorted(p.name for p in blocked.parent.glob("block-*.npz") if p.is_file()) == \
        ["block-00000.npz", "block-00001.npz", "block-00003.npz"]
