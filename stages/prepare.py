"""Prepare stage: dataset -> Parquet manifests per split (+ VQA questions).

Reads  params `prepare.*` and the source data (easy-VQA package or a folder).
Writes data/prepared/{split}.parquet, {split}_questions.parquet, report.json.

    python -m stages.prepare
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipeline import data, paths
from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from stages.common import main_guard, parser

log = logging.getLogger("stages.prepare")


def run(cfg: Config, out_dir: Path = paths.PREPARED) -> dict:
    """Write one manifest per split; return the counts report."""
    splits, report = data.load_source(cfg.prepare)
    for split in splits:
        data.write_split(out_dir, split)
    write_json_atomic(Path(out_dir) / "report.json", report)
    for name, counts in report.items():
        log.info("prepare %s: %s", name, json.dumps(counts))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    return main_guard(lambda a, cfg: run(cfg, Dirs.under(a.data).prepared), args)


if __name__ == "__main__":
    sys.exit(main())
