"""Retrieval evaluation of one trained bridge: image->text and text->image over the test images.

Reads  the bridge data/models/<method>/, the test features, data/prototypes (z_t, prior), params
       `evaluate.common`, `evaluate.retrieval`.
       Every scorer (cosine, assignment, centred) for every method; the assignment and centred scorers are
       fitted on training images and captions only, so a query's score never depends on the other test items.
Writes data/metrics/retrieval/<method>.json (with chance levels, and per domain where the test images
       have one: zero-shot seen/unseen), data/plots/retrieval/<method>/recall_at_k.json (R@1..10 curves of
       every scorer), ranks.json (every query's rank under every scorer);
       "not applicable" on a test split without reference captions (VQAv2).

    python -m stages.evaluate_retrieval --method vlap

With evaluate.common.nproc_per_node > 1 the stage starts that many processes under torchrun itself: each
bridges its shard of the test (and fitting) images, rank 0 scores them all and writes the one-process outputs.
"""
from __future__ import annotations

import sys

from pipeline import distributed
from pipeline.manifest import has_captions, read_manifest
from pipeline.features import features_file
from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.tasks.inputs import load_eval_inputs
from pipeline.tasks.retrieval import evaluate_retrieval, fit_on_training
from stages.sharded import run_sharded
from stages.common import (EVALUATION_DEPS, EVALUATION_PARAMS, NO_TEST_CAPTIONS, Out, StageSpec,
                           stage_main, write_metrics, write_not_applicable)

STAGE = StageSpec(
    name="evaluate_retrieval", description=__doc__.splitlines()[0], per_method=True,
    params=EVALUATION_PARAMS + ("evaluate.retrieval", "evaluate.common.nproc_per_node"),
    deps=EVALUATION_DEPS,
    outs=(Out("metrics/retrieval/{method}.json", kind="metrics", cache=False),
          Out("plots/retrieval/{method}/recall_at_k.json", kind="plots", cache=False),
          Out("plots/retrieval/{method}/ranks.json", cache=False, items=True)),
)


def run(cfg: Config, dirs: Dirs, method: str, *, lm=None) -> dict:
    if not has_captions(dirs.prepared, "test"):
        return write_not_applicable(STAGE, dirs, method, NO_TEST_CAPTIONS)
    return run_sharded(STAGE, cfg, dirs, method, "retrieval", lambda ranks: evaluate(cfg, dirs, method, ranks))


def evaluate(cfg: Config, dirs: Dirs, method: str, ranks: distributed.Ranks) -> dict:
    """This process's part: its shard of the bridged images; on rank 0 the scores and every output."""
    inputs = load_eval_inputs(cfg, method, dirs, need_lm=False)  # z_v and z_t need no LLM
    if len(inputs.image_ids) < 2:
        if not ranks.is_main:
            return {}
        return write_not_applicable(STAGE, dirs, method, f"retrieval needs at least 2 test images with captions "
                                                         f"and features, the data has {len(inputs.image_ids)}")
    fit = fit_on_training(inputs, features_file(dirs.features, "train"), read_manifest(dirs.prepared, "train"),
                          cfg.evaluate.retrieval, cfg.evaluate.common.batch_size, ranks)
    evaluated = evaluate_retrieval(inputs, cfg, fit, ranks)
    if evaluated is None:  # not rank 0: it wrote nothing
        return {}
    metrics, curve, per_query = evaluated
    write_json_atomic(dirs.plots / "retrieval" / method / "recall_at_k.json", curve)
    write_json_atomic(STAGE.items_path(dirs, method), per_query)
    return write_metrics(dirs, "retrieval", method, metrics)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
