"""Prepare stage: dataset -> Parquet manifests per split (+ VQA questions where the data has them).

Reads  params `prepare.*` and the source data (easy-VQA package, a folder, a Karpathy split file, tar shards,
       CC3M, NoCaps, VQAv2; prepare.test_source: a second source for the test split; docs/datasets.md).
       `prepare.heldout` keeps colour-shape combinations out of training (the zero-shot split: test images
       get the domain seen/unseen); `prepare.validation_fraction` carves the val split out of train.
Writes data/prepared/{split}.parquet, {split}_questions.parquet, report.json (counts).

    python -m stages.prepare
"""
from __future__ import annotations

import json
import logging
import sys

from pipeline.manifest import write_split
from pipeline.sources.prepare import prepare_splits
from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from stages.common import Out, StageSpec, stage_main

STAGE = StageSpec(
    name="prepare", description=__doc__.splitlines()[0],
    params=("prepare",),
    deps=("sources.json",),  # the digest of the source's files: an edited image or annotation re-runs prepare
    outs=(Out("prepared"),),
)
log = logging.getLogger("stages.prepare")


def run(cfg: Config, dirs: Dirs, method: None = None, *, lm=None) -> dict:
    """Write one manifest per split; return the counts report."""
    splits, report = prepare_splits(cfg.prepare)
    for split in splits:
        write_split(dirs.prepared, split)
    write_json_atomic(dirs.prepared / "report.json", report)
    for name, counts in report.items():
        log.info("prepare %s: %s", name, json.dumps(counts))
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
