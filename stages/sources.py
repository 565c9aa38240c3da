"""Sources stage: a content digest of the data prepare reads, so DVC re-runs prepare when it changes.

Reads  params `prepare.*` (which files and folders the source is) and those files: the packaged
       easy-VQA data, or every file under prepare.folder / test_folder and the annotation and
       question files (pipeline.sources.source_paths).
Writes data/sources.json: params key -> sha256 over its files' names and contents (git-tracked, the
       same on every machine for the same data). The stage always runs (`always_changed`); each file
       is read in full only when it is new or changed (pipeline.digests), and prepare, which depends on
       this file, re-runs only when a digest moved.

    python -m stages.sources
"""
from __future__ import annotations

import logging
import sys

from pipeline.config import Config
from pipeline.digests import tree_digest
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.sources.prepare import SOURCE_KEYS, source_paths
from stages.common import Out, StageSpec, stage_main

STAGE = StageSpec(
    name="sources", description=__doc__.splitlines()[0],
    params=("prepare.source",) + tuple(f"prepare.{key}" for key in SOURCE_KEYS),
    deps=(),
    outs=(Out("sources.json", cache=False),),
    always_changed=True,
)
log = logging.getLogger("stages.sources")


def run(cfg: Config, dirs: Dirs, method: None = None, *, lm=None) -> dict:
    digests = {key: tree_digest(path) for key, path in source_paths(cfg.prepare).items()}
    write_json_atomic(dirs.root / "sources.json", digests)
    log.info("sources: %s", ", ".join(f"{k} {v[:12]}" for k, v in digests.items()))
    return digests


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
