"""The prepare stage's reading of the data: the configured source's splits (and a test source's), then
the zero-shot hold-out and the validation split. Sources and their files: docs/datasets.md.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.manifest import Split
from pipeline.paths import package_dir
from pipeline.sources import loader
from pipeline.sources.common import TEST_ROLE, TRAIN_ROLE, Role
from pipeline.sources.splits import carve_validation, hold_out_combinations, zero_shot_unsupported

log = logging.getLogger(__name__)

SOURCE_KEYS = ("folder", "annotations", "questions", "test_folder", "test_annotations", "test_questions")


def source_paths(cfg: PrepareConfig) -> dict[str, Path]:
    """Everything prepare reads outside data/, by the params key (or package) that names it: the
    packaged easy-VQA data, and every file or folder a prepare key names (the test source's too)."""
    paths = {"package:easy_vqa": package_dir("easy_vqa") / "data"} if cfg.source == "easyvqa" else {}
    return paths | {f"prepare.{key}": Path(getattr(cfg, key)) for key in SOURCE_KEYS if getattr(cfg, key)}


def load_one(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    return loader(cfg.source)(cfg, role)


def load_source(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    """The splits of prepare.source; with prepare.test_source, its test split replaces the training
    source's (train on CC3M, test on NoCaps), and the training source, read with test_fraction 0,
    keeps every image it would have hashed into test."""
    if not cfg.test_source:
        return load_one(cfg)
    splits, report = load_one(replace(cfg, test_fraction=0.0))
    test_cfg = replace(cfg, source=cfg.test_source, folder=cfg.test_folder, annotations=cfg.test_annotations,
                       questions=cfg.test_questions, shards="", test_fraction=1.0, test_source="")
    test_splits, test_report = load_one(test_cfg, TEST_ROLE)
    test = next((s for s in test_splits if s.name == "test"), None)
    if test is None:
        raise DatasetError(f"prepare.test_source {cfg.test_source}: its files give no test split "
                           f"(only {', '.join(s.name for s in test_splits) or 'nothing'})")
    names = {s.name for s in test_splits}
    report = {k: v for k, v in report.items() if k != "test"} | {"test": test_report["test"]}
    report["test_source"] = {"source": cfg.test_source} | {k: v for k, v in test_report.items() if k not in names}
    return sorted([s for s in splits if s.name != "test"] + [test], key=lambda s: s.name), report


def prepare_splits(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    """The source's splits, then the zero-shot hold-out and the validation split where params ask. The
    zero-shot split is easy-VQA's (colour-shape combinations): data without those labels skips it, with the
    reason in the report and the log, and every other stage runs as without `prepare.heldout`."""
    splits, report = load_source(cfg)
    if cfg.heldout:
        reason = zero_shot_unsupported(splits)
        if reason:
            log.warning("prepare.heldout: %s", reason)
            report["zero_shot"] = {"applicable": False, "reason": reason}
        else:
            report["zero_shot"] = hold_out_combinations(splits, cfg.heldout)
    if cfg.validation_fraction:
        splits = carve_validation(splits, cfg.validation_fraction)
    if cfg.heldout or cfg.validation_fraction:
        report["splits"] = {s.name: {"images": len(s.images), "questions": len(s.questions)} for s in splits}
    return splits, report
