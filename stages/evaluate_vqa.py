"""VQA evaluation of one trained bridge on the test questions: open/closed, 0-shot and n-shot.

Reads  the bridge data/models/<method>/, the test (and, for shots, train) features, the questions
       tables, params `evaluate.common`, `evaluate.vqa`.
Writes data/metrics/vqa/<method>.json, data/plots/vqa/<method>/answers.json (every answer).
       Data without a questions table gives a metrics file that says "not applicable".

    python -m stages.evaluate_vqa --method vlap

With evaluate.common.nproc_per_node > 1 the stage starts that many processes under torchrun itself: each
answers its shard of the questions, rank 0 scores them all and writes the one-process outputs.
"""
from __future__ import annotations

import random
import sys

import torch

from pipeline import distributed
from pipeline.manifest import has_questions, read_questions
from pipeline.features import FeatureCache, features_file
from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.tasks.inputs import load_eval_inputs
from pipeline.tasks.vqa import (answer_questions, answer_vocabulary, chance_accuracy, select_questions, shots_prefix,
                                summarise)
from stages.sharded import run_sharded
from stages.common import (EVALUATION_DEPS, Out, StageSpec, stage_main, write_metrics,
                           write_not_applicable)

STAGE = StageSpec(
    name="evaluate_vqa", description=__doc__.splitlines()[0], per_method=True,
    params=("evaluate.common", "evaluate.vqa", "prepare.folder", "prepare.test_folder"),
    deps=EVALUATION_DEPS,
    outs=(Out("metrics/vqa/{method}.json", kind="metrics", cache=False),
          Out("plots/vqa/{method}/answers.json", cache=False, items=True)),
)


def pick_shots(dirs: Dirs, n: int, seed: int) -> tuple[list[dict], list[torch.Tensor]]:
    """n training questions (fixed by the seed) and their images' cached tokens."""
    if n == 0:
        return [], []
    with FeatureCache(features_file(dirs.features, "train")) as cache:
        pool = [q for q in read_questions(dirs.prepared, "train") if q["image_id"] in cache.index]
        shots = random.Random(seed).sample(pool, min(n, len(pool)))
        return shots, [torch.from_numpy(cache.tokens([q["image_id"]])[0]) for q in shots]


def run(cfg: Config, dirs: Dirs, method: str, *, lm=None) -> dict:
    if not has_questions(dirs.prepared, "test"):
        return write_not_applicable(STAGE, dirs, method, "the prepared data has no test questions "
                                                         "(VQA needs a source with questions, e.g. easy-VQA)")
    return run_sharded(STAGE, cfg, dirs, method, "vqa", lambda ranks: evaluate(cfg, dirs, method, lm, ranks))


def evaluate(cfg: Config, dirs: Dirs, method: str, lm, ranks: distributed.Ranks) -> dict:
    """This process's part: its shard of the questions; on rank 0 the scores and every output."""
    vcfg, common = cfg.evaluate.vqa, cfg.evaluate.common
    test_questions = read_questions(dirs.prepared, "test")
    inputs = load_eval_inputs(cfg, method, dirs, lm=lm, only={q["image_id"] for q in test_questions})
    questions = select_questions(test_questions, inputs.image_ids, vcfg.questions, common.seed)
    if not questions:
        if not ranks.is_main:
            return {}
        return write_not_applicable(STAGE, dirs, method, "no test question is about an evaluated test image")
    train_questions = read_questions(dirs.prepared, "train") if has_questions(dirs.prepared, "train") else []
    answer_set = answer_vocabulary(test_questions + train_questions, vcfg.closed_answers)
    metrics, records = {"questions": len(questions)}, {}
    if ranks.is_main:
        metrics["chance_accuracy"] = chance_accuracy(questions, answer_set)
    for n in sorted({0, vcfg.shots if train_questions else 0}):
        shots, shot_tokens = pick_shots(dirs, n, common.seed)
        prefix = shots_prefix(inputs.lm, shot_tokens, shots, inputs.bridge)
        answered = answer_questions(inputs, questions, prefix, answer_set, common.batch_size, vcfg.max_new_tokens,
                                    ranks)
        if answered is not None:  # rank 0: every question's record, in question order
            records[f"{n}shot"] = answered
            metrics |= summarise(answered, f"{n}shot")
    if not ranks.is_main:  # it wrote nothing
        return {}
    write_json_atomic(STAGE.items_path(dirs, method), records)
    return write_metrics(dirs, "vqa", method, metrics)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
