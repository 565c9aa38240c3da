"""Summary stage: every method x every task's headline metric in one table and one bar plot.

Reads  data/metrics/<task>/<method>.json for all tasks and methods.
Writes data/metrics/summary.md, data/metrics/summary.json, data/plots/summary.png

    python -m stages.summarize
"""
from __future__ import annotations

import logging
import sys

from pipeline.config import METHODS, Config
from pipeline.io import write_json_atomic, write_text_atomic
from pipeline.paths import Dirs
from pipeline.tasks.summary import bar_plot, collect, markdown_table
from stages.common import main_guard, parser

log = logging.getLogger("stages.summarize")


def run(cfg: Config, dirs: Dirs = Dirs()) -> str:
    table = collect(dirs.metrics, list(METHODS))
    text = "# VLAP vs baselines (headline metrics; higher is better)\n\n" + markdown_table(table)
    write_text_atomic(dirs.metrics / "summary.md", text)
    write_json_atomic(dirs.metrics / "summary.json", table)
    bar_plot(table, dirs.plots / "summary.png")
    log.info("\n%s", text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    return main_guard(lambda a, cfg: run(cfg, Dirs.under(a.data)), args)


if __name__ == "__main__":
    sys.exit(main())
