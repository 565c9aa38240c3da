"""Shared fixtures: the real packaged models (loaded once per session) and small real data."""
from __future__ import annotations

import dataclasses
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test repos' `dvc` commands start no analytics process (one per command: 62 in a run of the suite)
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Each test process (one per pytest-xdist worker) and the flows it starts get their own Prefect home: two
# temporary Prefect servers never share one SQLite database, and the user's ~/.prefect is left alone.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vlap-test-prefect-")
# Under pytest-xdist (`make test`: one worker per core) each worker and the processes it starts compute on one
# thread: the workers share the cores instead of oversubscribing them. Set before torch is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

from pipeline.runtime import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()  # as every stage process does, before the first tensor operation

import pytest
import torch

from pipeline.manifest import Manifest, Split, resolve_image_root, write_split
from pipeline.sources import easyvqa
from pipeline.config import Config
from pipeline.paths import Dirs
from pipeline.runtime import keep_freed_memory

keep_freed_memory()  # as the stages do: much faster batched CPU inference


@pytest.fixture(scope="session")
def easyvqa_splits():
    splits, report = easyvqa.load()
    return {s.name: s for s in splits}, report


@pytest.fixture(scope="session")
def easyvqa_root(easyvqa_splits):
    splits, _ = easyvqa_splits
    return resolve_image_root(splits["train"].image_root, Config().prepare)


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary local Prefect server and SQLite database for the session (offline)."""
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # tasks run outside a flow
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # slow to start on a loaded machine
        yield


def small_manifest(split: Split, n: int) -> Manifest:
    return Manifest(split.name, split.image_root, split.images[:n])


@pytest.fixture(scope="session")
def manifest32(easyvqa_splits):
    return small_manifest(easyvqa_splits[0]["train"], 32)


@pytest.fixture(scope="session")
def lite0():
    from pipeline.encoders import load_encoder

    return load_encoder("efficientnet-lite0", torch.device("cpu"))


@pytest.fixture(scope="session")
def smollm2():
    from pipeline.lms import load_lm

    return load_lm("smollm2-135m", torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, easyvqa_splits, smollm2):
    """prepare -> extract -> prototypes on 64 train, 16 val (more training images) + 32 test real easy-VQA
    images, through the stages."""
    from stages import extract, prototypes

    splits, _ = easyvqa_splits
    dirs = Dirs.under(tmp_path_factory.mktemp("pipeline"))
    for name, source, rows in (("train", "train", slice(0, 64)), ("val", "train", slice(64, 80)),
                               ("test", "test", slice(0, 32))):
        split = splits[source]
        ids = {r.image_id for r in split.images[rows]}
        questions = [q for q in split.questions if q["image_id"] in ids]
        write_split(dirs.prepared, Split(name, split.image_root, split.images[rows], questions))
    # no validation while training (the one test of it turns it on): the other tests time and count other things
    cfg = Config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, validation=dataclasses.replace(cfg.train.validation, every=0)))
    extract.run(cfg, dirs)
    prototypes.run(cfg, dirs, lm=smollm2)
    return cfg, dirs
