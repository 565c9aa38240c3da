"""Retrieval evaluation of one trained bridge: image->text and text->image over the test images.

Reads  data/models/<method>/bridge.pt, the test features, data/prototypes (z_t, prior), params
       `evaluate.common`, `evaluate.retrieval`.
Writes data/metrics/retrieval/<method>.json, data/plots/retrieval/<method>/recall_at_k.json (R@1..10 curve)

    python -m stages.evaluate_retrieval --method vlap
"""
from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.tasks.inputs import load_eval_inputs
from pipeline.tasks.retrieval import evaluate_retrieval
from stages.common import method_stage_main, write_metrics


def run(cfg: Config, method: str, dirs: Dirs = Dirs()) -> dict:
    inputs = load_eval_inputs(cfg, method, dirs, need_lm=False)  # z_v and z_t need no LLM
    metrics, curve = evaluate_retrieval(inputs, cfg)
    write_json_atomic(dirs.plots / "retrieval" / method / "recall_at_k.json", curve)
    write_metrics(dirs.metrics, "retrieval", method, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return method_stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
