"""Shared fixtures: the real packaged models (loaded once per session) and small real data."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from pipeline import data
from pipeline.config import Config


@pytest.fixture(scope="session")
def easyvqa_splits():
    splits, report = data.load_easyvqa()
    return {s.name: s for s in splits}, report


@pytest.fixture(scope="session")
def easyvqa_root(easyvqa_splits):
    splits, _ = easyvqa_splits
    return data.resolve_image_root(splits["train"].image_root, Config().prepare)


def small_manifest(split: data.Split, n: int) -> data.Manifest:
    return data.Manifest(split.name, split.image_root, split.images[:n])


@pytest.fixture(scope="session")
def lite0():
    from pipeline.encoders import load_encoder

    return load_encoder("efficientnet-lite0", torch.device("cpu"))


@pytest.fixture(scope="session")
def smollm2():
    from pipeline.lms import load_lm

    return load_lm("smollm2-135m", torch.device("cpu"))
