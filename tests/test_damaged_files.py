"""Damaged stage outputs, written for real (truncated or garbled files): each reader stops with one line
that names the file and says how to go on, never a traceback. (Damaged shard parts and feature files
are made again: tests/test_extract.py; a damaged resume checkpoint: tests/test_train.py.)"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.bridge import build_bridge, load_bridge, save_bridge
from pipeline.errors import CacheError
from pipeline.features import FeatureCache, features_file
from pipeline.prototypes import load_prototypes, prototypes_file


def one_line_error(call, path, *parts) -> str:
    with pytest.raises(CacheError) as err:
        call()
    text = str(err.value)
    assert text.startswith(str(path)) and "\n" not in text and all(p in text for p in parts), text
    return text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not an object"])
def test_damaged_indexes(tmp_path, damage):
    content = {"truncated": '{"train": {"file": "ab', "garbage": "\x00\x01", "not an object": "[1, 2]"}[damage]
    (tmp_path / "index.json").write_text(content)
    one_line_error(lambda: features_file(tmp_path, "train"), tmp_path / "index.json", "damaged feature index",
                   "dvc repro -f extract")
    one_line_error(lambda: prototypes_file(tmp_path), tmp_path / "index.json", "damaged prototypes index",
                   "dvc repro -f prototypes")


def test_truncated_feature_and_prototype_files(tmp_path):
    features, prototypes = tmp_path / "features.h5", tmp_path / "prototypes.h5"
    with h5py.File(features, "w") as f:
        f["image_ids"] = np.array([b"0", b"1"])
        f["tokens"] = np.zeros((2, 4, 8), np.float32)
    with h5py.File(prototypes, "w") as f:
        f["texts"] = np.array([b"a"])
        f["prototypes"] = np.zeros((1, 8), np.float32)
    for path in (features, prototypes):
        path.write_bytes(path.read_bytes()[:700])
    one_line_error(lambda: FeatureCache(features), features, "not a readable feature cache", "dvc repro -f extract")
    one_line_error(lambda: load_prototypes(prototypes), prototypes, "not a readable prototypes cache",
                   "dvc repro -f prototypes")


def test_damaged_bridge_weights_and_config(tmp_path):
    folder = tmp_path / "vlap"
    save_bridge(folder, build_bridge("linear", 8, 16), {"bridge": "linear", "d_vision": 8, "d_model": 16})
    bridge, _ = load_bridge(folder)
    assert isinstance(bridge, torch.nn.Module)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    one_line_error(lambda: load_bridge(folder), weights, "not a readable bridge", "dvc repro -f train@vlap")
    weights.write_bytes(whole)
    config = folder / "config.json"
    config.write_text(config.read_text()[:20])
    one_line_error(lambda: load_bridge(folder), config, "not a readable bridge config", "dvc repro -f train@vlap")
    config.write_text(json.dumps({"bridge": "linear", "d_vision": 8, "d_model": 32}))  # another shape
    one_line_error(lambda: load_bridge(folder), weights, "not a readable bridge")
