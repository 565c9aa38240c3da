"""Summary stage: every method x every task's headline metric in one table and one bar plot.

Reads  data/metrics/<task>/<method>.json for all tasks and methods, data/prepared/report.json (whether the
       zero-shot split was made), and the committed study's verdicts, shown only where the study was made
       with this run's setting (data, models, budget: pipeline.tasks.summary.study_setting).
Writes data/metrics/summary.md, data/metrics/summary.json, data/plots/summary.png.
       A task the data has no inputs for shows "n/a" with its reason; so does a zero-shot split it cannot hold.

    python -m stages.summarize
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipeline.config import METHODS, Config
from pipeline.io import write_json_atomic
from pipeline.report import write_markdown
from pipeline.paths import Dirs
from pipeline.tasks.registry import HEADLINES
from pipeline.tasks.summary import (bar_plot, collect, markdown_table, study_mismatch, study_setting,
                                    study_verdicts)
from stages.common import Out, StageSpec, stage_main

STUDY = "results/study-easyvqa/study.json"  # the committed study: which differences are real
STAGE = StageSpec(
    name="summarize", description=__doc__.splitlines()[0],
    params=("prepare.source", "prepare.test_source", "prepare.heldout", "extract.encoder", "prototypes.llm",
            "train.steps", "train.epochs", "train.batch_size"),  # the setting a study's verdicts must match
    deps=("prepared/report.json", *(f"metrics/{task}" for task in HEADLINES)),
    files=(STUDY,),
    outs=(Out("metrics/summary.md", cache=False), Out("metrics/summary.json", cache=False),
          Out("plots/summary.png", kind="plots", cache=False)),
)
log = logging.getLogger("stages.summarize")


def run(cfg: Config, dirs: Dirs, method: None = None, *, lm=None) -> dict:
    table, reasons, chance = collect(dirs.metrics, list(METHODS))
    report = dirs.prepared / "report.json"  # absent only where summarize runs on metrics alone (tests)
    zero_shot = json.loads(report.read_text()).get("zero_shot") if report.exists() else None
    if zero_shot and zero_shot.get("applicable") is False:
        reasons["zero-shot split"] = zero_shot["reason"]
    columns = {c for row in table.values() for c in row}
    groups = "".join(text for suffixes, text in (
        (("_seen", "_unseen"), "Rows ending in _seen / _unseen are the zero-shot split: test images whose colour-shape "
                               "combination training did / did not show. "),
        (("_in", "_near", "_out"), "Rows ending in _in / _near / _out are the test source's domains (NoCaps: in-, "
                                   "near- and out-of-domain). "))
        if any(c.endswith(suffixes) for c in columns))
    mismatch = study_mismatch(Path(STUDY), study_setting(cfg))
    verdicts = {} if mismatch else study_verdicts(Path(STUDY))
    if mismatch:
        reasons["study verdicts"] = f"{STUDY} is not shown: {mismatch}"
    text = ("# VLAP vs baselines (headline metrics; higher is better, except taxonomy/modality_gap, a distance)\n\n"
            "Retrieval rows compare every method under the same scorer. " + groups +
            "`chance`: a random caption, answer or ranking. " + (f"The last column: the differences the committed "
            f"study ({STUDY}: several seeds, 95% intervals) found real; a one-seed run can order the others "
            "either way.\n\n" if verdicts else "\n\n") + markdown_table(table, reasons, chance, verdicts))
    write_markdown(dirs.metrics / "summary.md", text)
    write_json_atomic(dirs.metrics / "summary.json", {"table": table, "not_applicable": reasons, "chance": chance,
                                                      "study_real_differences": verdicts})
    bar_plot(table, dirs.plots / "summary.png", chance)
    log.info("\n%s", text)
    return {"table": table, "not_applicable": reasons}


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
