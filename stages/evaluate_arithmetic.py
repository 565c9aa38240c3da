"""Visual semantic arithmetic of one trained bridge: swap one caption word, retrieve, decode.

Reads  the bridge data/models/<method>/, the test features and attributes, the LLM's word embeddings,
       params `evaluate.common`, `evaluate.arithmetic`, `evaluate.caption.max_new_tokens` (decoding).
Writes data/metrics/arithmetic/<method>.json, data/plots/arithmetic/<method>/queries.json (every query and
       whether it hit), data/pages/arithmetic/<method>.html (examples);
       "not applicable" on a test split without reference captions (VQAv2).

    python -m stages.evaluate_arithmetic --method vlap
"""
from __future__ import annotations

import sys

from pipeline.manifest import has_captions
from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.tasks.arithmetic import evaluate_arithmetic
from pipeline.tasks.caption_metrics import write_examples_html
from pipeline.tasks.inputs import load_eval_inputs
from stages.common import (EVALUATION_DEPS, EVALUATION_PARAMS, NO_TEST_CAPTIONS, Out, StageSpec, stage_main,
                           write_metrics, write_not_applicable)

STAGE = StageSpec(
    name="evaluate_arithmetic", description=__doc__.splitlines()[0], per_method=True,
    params=EVALUATION_PARAMS + ("evaluate.arithmetic", "evaluate.caption.max_new_tokens"),
    deps=EVALUATION_DEPS,
    outs=(Out("metrics/arithmetic/{method}.json", kind="metrics", cache=False),
          Out("plots/arithmetic/{method}/queries.json", cache=False, items=True),
          Out("pages/arithmetic/{method}.html")),
)


def run(cfg: Config, dirs: Dirs, method: str, *, lm=None) -> dict:
    if not has_captions(dirs.prepared, "test"):
        return write_not_applicable(STAGE, dirs, method, NO_TEST_CAPTIONS)
    inputs = load_eval_inputs(cfg, method, dirs, lm=lm)
    metrics, examples, per_query = evaluate_arithmetic(inputs, cfg)
    if not metrics:
        return write_not_applicable(STAGE, dirs, method, "no test image pair differs in exactly one attribute word "
                                                         "(see README: visual semantic arithmetic)")
    write_json_atomic(STAGE.items_path(dirs, method), per_query)
    write_examples_html(dirs.pages / "arithmetic" / f"{method}.html", examples,
                        f"Visual semantic arithmetic with the {method} bridge")
    return write_metrics(dirs, "arithmetic", method, metrics)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
