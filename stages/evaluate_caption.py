"""Captioning evaluation of one trained bridge: greedy captions of the test images, COCO metrics.

Reads  the bridge data/models/<method>/, the test features, data/prototypes, params `evaluate.common`, `evaluate.caption`.
Writes data/metrics/caption/<method>.json, data/plots/caption/<method>/captions.json (every generated
       caption) and data/pages/caption/<method>.html (examples). Test images with a domain (NoCaps)
       add CIDEr per domain (CIDEr_in, CIDEr_near, CIDEr_out, CIDEr_overall). A test split without
       reference captions (VQAv2) gives outputs that say "not applicable".

    python -m stages.evaluate_caption --method vlap

With evaluate.common.nproc_per_node > 1 the stage starts that many processes under torchrun itself: each
decodes its shard of the test images, rank 0 scores them all and writes the one-process outputs.
"""
from __future__ import annotations

import sys

from pipeline import distributed
from pipeline.manifest import has_captions, read_manifest, report_group
from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.tasks.caption_metrics import chance_scores, cider_by_domain, start_meteor, write_examples_html
from pipeline.tasks.captioning import evaluate_captioning
from pipeline.tasks.inputs import load_eval_inputs
from stages.sharded import run_sharded
from stages.common import (EVALUATION_DEPS, EVALUATION_PARAMS, NO_TEST_CAPTIONS, Out, StageSpec,
                           stage_main, write_metrics, write_not_applicable)

STAGE = StageSpec(
    name="evaluate_caption", description=__doc__.splitlines()[0], per_method=True,
    params=EVALUATION_PARAMS + ("evaluate.caption", "evaluate.common.seed",  # seed: the chance-level captions
                                "evaluate.common.nproc_per_node"),
    deps=EVALUATION_DEPS,
    outs=(Out("metrics/caption/{method}.json", kind="metrics", cache=False),
          Out("plots/caption/{method}/captions.json", cache=False, items=True),
          Out("pages/caption/{method}.html")),
)


def run(cfg: Config, dirs: Dirs, method: str, *, lm=None) -> dict:
    if not has_captions(dirs.prepared, "test"):
        return write_not_applicable(STAGE, dirs, method, NO_TEST_CAPTIONS)
    return run_sharded(STAGE, cfg, dirs, method, "caption", lambda ranks: evaluate(cfg, dirs, method, lm, ranks))


def evaluate(cfg: Config, dirs: Dirs, method: str, lm, ranks: distributed.Ranks) -> dict:
    """This process's part: its shard of the captions; on rank 0 the scores and every output."""
    if ranks.is_main:
        start_meteor()  # its JVM loads while the model loads and captions are generated
    inputs = load_eval_inputs(cfg, method, dirs, lm=lm)
    evaluated = evaluate_captioning(inputs, cfg, ranks)
    if evaluated is None:  # not rank 0: it wrote nothing
        return {}
    metrics, generated = evaluated
    metrics |= chance_scores(inputs.captions, read_manifest(dirs.prepared, "train"), cfg.evaluate.common.seed)
    domains = {i: report_group(a) for i, a in inputs.attributes.items() if report_group(a)}
    if domains:
        metrics |= cider_by_domain(inputs.captions, generated, domains)
    write_json_atomic(STAGE.items_path(dirs, method),
                      {i: {"generated": generated[i], "references": inputs.captions[i]} for i in generated})
    rows = [{"image_path": inputs.image_paths[i], "generated": generated[i], "references": inputs.captions[i]}
            for i in inputs.image_ids[: cfg.evaluate.caption.examples]]
    write_examples_html(dirs.pages / "caption" / f"{method}.html", rows, f"Captions by the {method} bridge")
    return write_metrics(dirs, "caption", method, metrics)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
