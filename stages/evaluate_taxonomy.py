"""Taxonomy and modality gap of one trained bridge: RSA of its label classes against their words, centroid gap.

Reads  the bridge data/models/<method>/, the test features, labels and cached caption representations, the
       LLM's word embeddings, params `evaluate.common`, `evaluate.taxonomy`.
Writes data/metrics/taxonomy/<method>.json, data/plots/taxonomy/<method>/items.json (each image's paired −
       unpaired cosine, the classes, the whole-set RSA); "not applicable" on a test split without reference
       captions (VQAv2). Without label classes only the RSA is n/a (its reason in the metrics file).

    python -m stages.evaluate_taxonomy --method vlap
"""
from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.manifest import has_captions
from pipeline.paths import Dirs
from pipeline.tasks.inputs import load_eval_inputs
from pipeline.tasks.taxonomy import evaluate_taxonomy
from stages.common import EVALUATION_DEPS, NO_TEST_CAPTIONS, Out, StageSpec, stage_main, write_metrics, write_not_applicable

STAGE = StageSpec(
    name="evaluate_taxonomy", description=__doc__.splitlines()[0], per_method=True,
    params=("evaluate.common.test_images", "evaluate.common.batch_size", "evaluate.common.device",
            "evaluate.common.seed", "evaluate.taxonomy"),  # no example page: no image root
    deps=EVALUATION_DEPS,
    outs=(Out("metrics/taxonomy/{method}.json", kind="metrics", cache=False),
          Out("plots/taxonomy/{method}/items.json", cache=False, items=True)),
)


def run(cfg: Config, dirs: Dirs, method: str, *, lm=None) -> dict:
    if not has_captions(dirs.prepared, "test"):
        return write_not_applicable(STAGE, dirs, method, NO_TEST_CAPTIONS)
    inputs = load_eval_inputs(cfg, method, dirs, lm=lm)
    t = cfg.evaluate.taxonomy
    metrics, items = evaluate_taxonomy(inputs, t.min_images, t.bootstrap, t.permutations, cfg.evaluate.common.seed,
                                       cfg.evaluate.common.batch_size)
    write_json_atomic(STAGE.items_path(dirs, method), items)
    return write_metrics(dirs, "taxonomy", method, metrics)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
