"""A full disk, for real: extraction and training write into a small tmpfs the test mounts, filled with
a ballast file. Running out of space is one line naming the file being written, leaves no partial file
where a complete one is expected, keeps finished work, and the run goes on once space is freed, ending
byte-identical to a run that never ran out."""
from __future__ import annotations

import dataclasses
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import DiskFullError
from pipeline.extraction import extract_split
from pipeline.manifest import Split, write_split
from stages import train
from tests.conftest import small_manifest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


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
from pipeline.manifest import Split, write_split
from pipeline.manifest import read_manifest
prepared, image_root, features = map(Path, sys.argv[1:4])
encoder = load_encoder("efficientnet-lite0", torch.device("cpu"))
sys.exit(report_user_errors(lambda: print("encoded", extract_split(read_manifest(prepared, "train"), image_root,
                                                                     encoder, features, batch_size=16,
                                                                     block_size=8).n_encoded)))
"""


def test_extraction_on_a_full_disk_keeps_its_shards_and_resumes_byte_identical(
        small_disk, easyvqa_splits, easyvqa_root, lite0, tmp_path):
    manifest = small_manifest(easyvqa_splits[0]["train"], 32)
    reference = extract_split(manifest, easyvqa_root, lite0, tmp_path / "reference", batch_size=16, block_size=8)
    prepared = tmp_path / "prepared"
    write_split(prepared, Split("train", manifest.image_root, manifest.images))
    features = small_disk / "features"

    def extract() -> subprocess.CompletedProcess:
        # the reference's thread count: CPU kernels may sum in another order with another count
        env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
        return subprocess.run([sys.executable, "-c", EXTRACT, str(prepared), str(easyvqa_root), str(features)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    # Room for the shard parts (about the file's size) but not for the assembled file as well: the disk
    # fills while the file is written.
    leave_free(small_disk, reference.path.stat().st_size * 3 // 2)
    full = extract()
    final = features / reference.path.name
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.strip().splitlines()[-1].startswith(f"error: {final}: no space left on device for it ("), \
        full.stderr
    assert "Traceback" not in full.stderr
    assert not final.exists() and no_temp_files(features)
    assert len(list(features.glob("*.parts/block-*.npz"))) == 4  # every shard kept
    free_all(small_disk)
    resumed = extract()
    assert resumed.returncode == 0 and "encoded 0" in resumed.stdout, resumed.stderr[-2000:]
    assert filecmp.cmp(reference.path, final, shallow=False)


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
