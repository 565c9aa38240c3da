"""A full disk, for real: extraction and training write into a small tmpfs the test mounts, filled with
a ballast file. Running out of space is one line naming the file being written, leaves no partial file
where a complete one is expected, keeps finished work, and the run goes on once space is freed, ending
byte-identical to a run that never ran out. Extraction runs out of space both where it checks first (the
assembled file) and where the kernel's ENOSPC is the first word of it (a shard's part, written inline or
by a Dask worker)."""
from __future__ import annotations

import dataclasses
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import get_task_stream

from pipeline.errors import DiskFullError
from pipeline.extraction import ShardCluster, extract_split
from pipeline.manifest import Split, read_manifest, write_split
from stages import train
from tests.conftest import small_manifest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the disk-full tests mount a small tmpfs to fill, and mounting needs root (CI runs "
                              "them as root)")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def leave_free(disk, free_bytes: int) -> None:
    """Fill the disk with a ballast file until `free_bytes` remain."""
    ballast = disk / "ballast"
    ballast.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - free_bytes
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(size, 0))  # written, not sparse: tmpfs counts the pages


def free_all(disk) -> None:
    (disk / "ballast").unlink()


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


# Extraction runs in its own process, as a stage does: HDF5's C library is left in a fragile state by a
# failed write (a later garbage collection in the same process can crash), and a real run ends there.
EXTRACT = """
import sys, torch
from pathlib import Path
from pipeline.encoders import load_encoder
from pipeline.errors import report_user_errors
from pipeline.extraction import extract_split
from pipeline.manifest import read_manifest
prepared, image_root, features = map(Path, sys.argv[1:4])
encoder = load_encoder("efficientnet-lite0", torch.device("cpu"))
sys.exit(report_user_errors(lambda: print("encoded", extract_split(read_manifest(prepared, "train"), image_root,
                                                                     encoder, features, batch_size=16,
                                                                     block_size=8).n_encoded)))
"""
N_SHARDS = 4  # 32 images, shards of 8


@pytest.fixture(scope="module")
def reference(easyvqa_splits, easyvqa_root, lite0, tmp_path_factory):
    """The file of a run that never ran out of space, and the prepared split the runs under test read."""
    manifest = small_manifest(easyvqa_splits[0]["train"], 32)
    folder = tmp_path_factory.mktemp("reference")
    write_split(folder / "prepared", Split("train", manifest.image_root, manifest.images))
    result = extract_split(manifest, easyvqa_root, lite0, folder / "features", batch_size=16, block_size=8)
    return result, folder / "prepared"


def extract(reference, easyvqa_root, features: Path) -> subprocess.CompletedProcess:
    # the reference's thread count: CPU kernels may sum in another order with another count
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-c", EXTRACT, str(reference[1]), str(easyvqa_root), str(features)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """The run failed with exit code 2 and one `error:` line, its last, and no traceback; that line."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr[-3000:]
    return errors[0]


def reference_manifest(reference):
    return read_manifest(reference[1], "train")


def part_size(result) -> int:
    """About one shard part's size: the parts together take about the assembled file's."""
    return result.path.stat().st_size // N_SHARDS


def whole_parts(parts: Path) -> list[str]:
    """The shard parts in `parts`, each checked to load whole."""
    names = sorted(p.name for p in parts.glob("block-*.npz"))
    for name in names:
        with np.load(parts / name) as part:
            assert len(part["ids"]) == 8 and part["tokens"].shape == (8, 49, 1280)
    return names


def test_extraction_on_a_full_disk_keeps_its_shards_and_resumes_byte_identical(small_disk, reference,
                                                                               easyvqa_root):
    result, _ = reference
    features = small_disk / "features"
    # Room for the shard parts (about the file's size) but not for the assembled file as well: the check of
    # free space before the file is written stops the run.
    leave_free(small_disk, result.path.stat().st_size * 3 // 2)
    final = features / result.path.name
    error = one_error_line(extract(reference, easyvqa_root, features))
    assert error.startswith(f"error: {final}: no space left on device for it ("), error
    assert not final.exists() and no_temp_files(features)
    assert len(whole_parts(features / f"{result.key}.parts")) == N_SHARDS  # every shard kept
    free_all(small_disk)
    resumed = extract(reference, easyvqa_root, features)
    assert resumed.returncode == 0 and "encoded 0" in resumed.stdout, resumed.stderr[-2000:]
    assert filecmp.cmp(result.path, final, shallow=False)


def test_a_shard_part_that_does_not_fit_is_one_line_and_the_rerun_encodes_only_the_missing_shards(
        small_disk, reference, easyvqa_root, lite0):
    """Nothing checks the disk before a part is written: the kernel's ENOSPC is the first sign of it."""
    result, _ = reference
    features = small_disk / "features"
    parts = features / f"{result.key}.parts"
    leave_free(small_disk, part_size(result) * 5 // 2)  # two parts fit, the third does not
    error = one_error_line(extract(reference, easyvqa_root, features))
    assert error.startswith(f"error: {parts / 'block-00002.npz'}: no space left on device while writing it ("), \
        error
    assert whole_parts(parts) == ["block-00000.npz", "block-00001.npz"]
    assert not (features / result.path.name).exists() and no_temp_files(features)  # nothing partial
    free_all(small_disk)
    resumed = extract_split(reference_manifest(reference), easyvqa_root, lite0, features, batch_size=16,
                            block_size=8)
    assert resumed.n_encoded == 16  # only the two shards whose parts did not fit
    assert filecmp.cmp(result.path, resumed.path, shallow=False)


def test_a_dask_workers_part_that_does_not_fit_is_the_same_one_line_and_the_rerun_encodes_only_the_rest(
        small_disk, reference, easyvqa_root, lite0, capfd):
    """Two local worker processes write the parts; a worker's ENOSPC ends the run in the one-line DiskFullError
    an inline run gives, without retrying the shard (it would fail the same way) or logging it as a failed
    task with its traceback."""
    result, _ = reference
    features = small_disk / "features"
    parts = features / f"{result.key}.parts"
    leave_free(small_disk, part_size(result) * 5 // 2)
    manifest = reference_manifest(reference)
    with ShardCluster(workers=2) as shards:  # its worker processes write to this test's captured stderr
        with get_task_stream(shards.client) as stream, pytest.raises(DiskFullError) as err:
            extract_split(manifest, easyvqa_root, lite0, features, batch_size=16, block_size=8, cluster=shards)
        assert len(stream.data) == N_SHARDS and all(t["status"] == "OK" for t in stream.data)  # one try each
        kept = whole_parts(parts)
        assert 1 <= len(kept) <= 2, kept  # two parts are written at once: which fit depends on the race
        missing = sorted({f"block-{b:05d}.npz" for b in range(N_SHARDS)} - set(kept))
        assert str(err.value).startswith(f"{parts / missing[0]}: no space left on device while writing it ("), \
            err.value
        assert "\n" not in str(err.value)
        assert not (features / result.path.name).exists() and no_temp_files(features)  # nothing partial
        free_all(small_disk)
        resumed = extract_split(manifest, easyvqa_root, lite0, features, batch_size=16, block_size=8,
                                cluster=shards)
    assert resumed.n_encoded == 8 * len(missing)  # the kept parts were not encoded again
    assert filecmp.cmp(result.path, resumed.path, shallow=False)
    logged = capfd.readouterr().err
    assert "Compute Failed" not in logged and "DiskFullError" not in logged, logged[-3000:]


def test_training_on_a_full_disk_keeps_its_last_checkpoint_and_resumes_to_the_same_bridge(
        small_disk, tiny_pipeline, smollm2, tmp_path):
    cfg, dirs = tiny_pipeline
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3, batch_size=4, checkpoint_every=1,
                                                             warmup_steps=1))
    reference = dirs.sharing_inputs(tmp_path / "reference")
    train.run(cfg, reference, "contrastive", lm=smollm2)
    run = dirs.sharing_inputs(small_disk / "run")
    assert not train.run(cfg, run, "contrastive", lm=smollm2, stop_after=1)["finished"]
    checkpoint = run.models / "checkpoints" / "contrastive.safetensors"
    step_1 = checkpoint.read_bytes()
    leave_free(small_disk, len(step_1) // 2)  # the logs fit; the next checkpoint does not
    with pytest.raises(DiskFullError) as err:
        train.run(cfg, run, "contrastive", lm=smollm2)
    assert str(err.value).startswith(f"{checkpoint}: no space left on device") and "\n" not in str(err.value)
    assert checkpoint.read_bytes() == step_1 and no_temp_files(run.models)  # the last whole checkpoint stays
    free_all(small_disk)
    assert train.run(cfg, run, "contrastive", lm=smollm2)["steps"] == 3
    assert (run.models / "contrastive" / "model.safetensors").read_bytes() == \
        (reference.models / "contrastive" / "model.safetensors").read_bytes()
