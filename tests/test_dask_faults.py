"""Extraction on a real Dask cluster the test starts (`dask scheduler`, `dask worker` processes, reached
through `extract.scheduler`'s path): a worker killed with SIGKILL in the middle of a shard, a shard that
fails on every try and the re-run once its cause is gone, and a scheduler reached over TLS."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from distributed import get_task_stream

from pipeline.errors import CacheError, ConfigError
from pipeline.extraction import ShardCluster, extract_split, tls_security
from pipeline.manifest import Manifest

DASK = str(Path(sys.executable).with_name("dask"))


@contextmanager
def dask_cluster(folder: Path, n_workers: int, tls: list[str] = ()):
    """A scheduler and `n_workers` single-thread workers without nannies (a killed worker stays dead);
    `tls`: the `--tls-*` options for both. Yields the scheduler's address."""
    address_file = folder / "scheduler.json"
    env = os.environ | {"DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(address_file), *tls], env=env, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(address_file.read_text())["address"]
        workers = [subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                     "--name", f"w{i}", *tls], env=env, stderr=subprocess.DEVNULL)
                   for i in range(n_workers)]
        yield address
    finally:
        for proc in workers + [scheduler]:
            proc.kill()
            proc.wait()


@pytest.fixture
def cluster(tmp_path):
    with dask_cluster(tmp_path, 2) as address:
        yield address


def distinct(manifest32, copies: int = 2) -> Manifest:
    rows = [dataclasses.replace(r, image_id=f"{r.image_id}-{k}") for k, r in enumerate(manifest32.images * copies)]
    return Manifest("train", manifest32.image_root, rows)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_gives_the_inline_file_byte_for_byte(cluster, manifest32, easyvqa_root, lite0,
                                                                      tmp_path):
    manifest = distinct(manifest32)  # 64 images, 8 shards
    inline = extract_split(manifest, easyvqa_root, lite0, tmp_path / "inline", batch_size=8, block_size=8)
    killed = []  # (worker address, the shard key it was computing)

    def executing(dask_worker) -> list[str]:
        """Run on a worker by `client.run` (defined here so it travels by value, not by module name): the
        keys of the tasks its thread is computing now."""
        return [str(ts.key) for ts in dask_worker.state.executing]

    with ShardCluster(scheduler=cluster) as shards:
        client = shards.client
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)  # worker address -> its process id

        def kill_a_busy_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if len(client.scheduler_info()["workers"]) == 2:
                    busy = [(w, keys[0]) for w, keys in client.run(executing).items() if keys]
                    if busy:
                        time.sleep(0.5)  # well inside the shard (one takes seconds)
                        worker, key = busy[0]
                        if key in client.run(executing, workers=[worker])[worker]:  # still on it
                            os.kill(pids[worker], signal.SIGKILL)
                            killed.append((worker, key))
                            return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker)
        # the scheduler's record of every task that finished, and on which worker
        with get_task_stream(client) as stream:
            killer.start()
            sharded = extract_split(manifest, easyvqa_root, lite0, tmp_path / "dask", batch_size=8, block_size=8,
                                    cluster=shards)
            killer.join()
        survivors = set(client.scheduler_info()["workers"])
    assert len(killed) == 1 and len(survivors) == 1  # one worker died, the other went on
    (dead, key), = killed
    finished_on = {str(t["key"]): t["worker"] for t in stream.data if t["status"] == "OK"}
    assert finished_on[key] in survivors and finished_on[key] != dead  # the killed shard was run again elsewhere
    assert sharded.n_encoded == 64
    assert filecmp.cmp(inline.path, sharded.path, shallow=False)


@pytest.mark.slow
def test_a_shard_that_fails_on_every_try_is_listed_then_resumed_once_fixed(cluster, manifest32, easyvqa_root,
                                                                            lite0, tmp_path):
    manifest = distinct(manifest32, copies=1)  # 32 images, 4 shards
    features = tmp_path / "features"
    inline = extract_split(manifest, easyvqa_root, lite0, tmp_path / "inline", batch_size=8, block_size=8)
    with ShardCluster(scheduler=cluster) as shards:
        # shard 2's part cannot be written: a folder stands where its file goes (the rename fails every try)
        blocked = features / f"{inline.key}.parts" / "block-00002.npz"
        (blocked / "in-the-way").mkdir(parents=True)
        with pytest.raises(CacheError) as err:
            extract_split(manifest, easyvqa_root, lite0, features, batch_size=8, block_size=8, cluster=shards)
        text = str(err.value)
        assert "1 of 4 shards failed after 2 retries: shard 2 (" in text and "finished shards are kept" in text
        assert "\n" not in text
        kept = sorted(p.name for p in blocked.parent.glob("block-*.npz") if p.is_file())
        assert kept == ["block-00000.npz", "block-00001.npz", "block-00003.npz"]

        shutil.rmtree(blocked)  # the cause removed, the same run again (same process, same client)
        with get_task_stream(shards.client) as stream:
            resumed = extract_split(manifest, easyvqa_root, lite0, features, batch_size=8, block_size=8,
                                    cluster=shards)
    # only shard 2 was encoded again: the scheduler ran one task, shard 2's (keys end in the shard index)
    assert [str(t["key"]).rsplit("-", 1)[1] for t in stream.data] == ["2"]
    assert resumed.n_encoded == 8 and not resumed.hit
    assert filecmp.cmp(inline.path, resumed.path, shallow=False)


def test_a_tls_scheduler_needs_its_certificates_and_tls_files_need_a_tls_scheduler(tmp_path):
    with pytest.raises(ConfigError) as err:
        tls_security("tls://10.0.0.1:8786", tls_ca_file=str(tmp_path / "ca.pem"))
    assert str(err.value) == (
        "extract.scheduler: tls://10.0.0.1:8786 is a TLS address, which needs extract.tls_ca_file, "
        "extract.tls_cert and extract.tls_key (empty: extract.tls_cert, extract.tls_key); give the cluster's "
        "CA file and this machine's certificate and key")
    with pytest.raises(ConfigError, match=r"^extract.tls_cert: .*cert.pem: no such file$"):
        tls_security("tls://10.0.0.1:8786", tls_ca_file=__file__, tls_cert=str(tmp_path / "cert.pem"),
                     tls_key=__file__)
    with pytest.raises(ConfigError, match=r"^extract.tls_key: only used with a tls:// extract.scheduler, "
                                          r"got 'tcp://10.0.0.1:8786'"):
        tls_security("tcp://10.0.0.1:8786", tls_key=__file__)


@pytest.mark.slow
def test_extraction_through_a_tls_scheduler_gives_the_inline_file_byte_for_byte(manifest32, easyvqa_root, lite0,
                                                                                 tmp_path):
    from distributed import Security

    # one self-signed certificate for the scheduler, the worker and this client; it is also the CA
    temporary = Security.temporary()
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.write_text(temporary.tls_ca_file)
    cert.write_text(temporary.tls_client_cert)
    key.write_text(temporary.tls_client_key)
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    inline = extract_split(manifest32, easyvqa_root, lite0, tmp_path / "inline", batch_size=8, block_size=8)
    with dask_cluster(tmp_path, 1, tls) as address:
        assert address.startswith("tls://")
        security = tls_security(address, tls_ca_file=str(ca), tls_cert=str(cert), tls_key=str(key))
        with ShardCluster(scheduler=address, security=security) as shards:
            shards.client.wait_for_workers(1, timeout=60)
            assert all(w.startswith("tls://") for w in shards.client.scheduler_info()["workers"])
            sharded = extract_split(manifest32, easyvqa_root, lite0, tmp_path / "dask", batch_size=8, block_size=8,
                                    cluster=shards)
    assert sharded.n_encoded == 32
    assert filecmp.cmp(inline.path, sharded.path, shallow=False)
