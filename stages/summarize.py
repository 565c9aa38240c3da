"""Summary stage: every method x every task's headline metric in one table and one bar plot.

Reads  data/metrics/<task>/<method>.json for all tasks and methods.
Writes data/metrics/summary.md, data/metrics/summary.json, data/plots/summary.png.
       A task the data has no inputs for shows "n/a" with its reason.

    python -m stages.summarize
"""
from __future__ import annotations

import logging
import sys

from pipeline.config import METHODS, Config
from pipeline.io import write_json_atomic, write_text_atomic
from pipeline.paths import Dirs
from pipeline.tasks.summary import HEADLINES, bar_plot, collect, markdown_table
from stages.common import Out, StageSpec, stage_main

STAGE = StageSpec(
    name="summarize", description=__doc__.splitlines()[0],
    params=(),
    deps=tuple(f"metrics/{task}" for task in HEADLINES),
    outs=(Out("metrics/summary.md", cache=False), Out("metrics/summary.json", cache=False),
          Out("plots/summary.png", kind="plots", cache=False)),
)
log = logging.getLogger("stages.summarize")


def run(cfg: Config, dirs: Dirs, method: None = None, *, lm=None) -> dict:
    table, reasons = collect(dirs.metrics, list(METHODS))
    text = "# VLAP vs baselines (headline metrics; higher is better)\n\n" + markdown_table(table, reasons)
    write_text_atomic(dirs.metrics / "summary.md", text)
    write_json_atomic(dirs.metrics / "summary.json", {"table": table, "not_applicable": reasons})
    bar_plot(table, dirs.plots / "summary.png")
    log.info("\n%s", text)
    return {"table": table, "not_applicable": reasons}


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
