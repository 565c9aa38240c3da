"""Visual semantic arithmetic of one trained bridge: swap colour or shape, retrieve, decode.

Reads  data/models/<method>/bridge.pt, the test features and attributes, the LLM's word embeddings,
       params `evaluate.common`, `evaluate.arithmetic`.
Writes data/metrics/arithmetic/<method>.json, data/plots/arithmetic/<method>/examples.html

    python -m stages.evaluate_arithmetic --method vlap
"""
from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.paths import Dirs
from pipeline.tasks.arithmetic import evaluate_arithmetic
from pipeline.tasks.caption_metrics import write_examples_html
from pipeline.tasks.inputs import load_eval_inputs
from stages.common import method_stage_main, write_metrics


def run(cfg: Config, method: str, dirs: Dirs = Dirs(), lm=None) -> dict:
    inputs = load_eval_inputs(cfg, method, dirs, lm=lm)
    metrics, examples = evaluate_arithmetic(inputs, cfg)
    write_examples_html(dirs.plots / "arithmetic" / method / "examples.html", examples,
                        f"Visual semantic arithmetic with the {method} bridge")
    write_metrics(dirs.metrics, "arithmetic", method, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return method_stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
