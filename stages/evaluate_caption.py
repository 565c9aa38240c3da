"""Captioning evaluation of one trained bridge: greedy captions of the test images, COCO metrics.

Reads  data/models/<method>/bridge.pt, the test features, data/prototypes, params `evaluate.common`, `evaluate.caption`.
Writes data/metrics/caption/<method>.json, data/plots/caption/<method>/examples.html
       and data/plots/caption/<method>/captions.json (every generated caption).

    python -m stages.evaluate_caption --method vlap
"""
from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.tasks.caption_metrics import write_examples_html
from pipeline.tasks.captioning import evaluate_captioning
from pipeline.tasks.inputs import load_eval_inputs
from stages.common import method_stage_main, write_metrics


def run(cfg: Config, method: str, dirs: Dirs = Dirs(), lm=None) -> dict:
    inputs = load_eval_inputs(cfg, method, dirs, lm=lm)
    metrics, generated = evaluate_captioning(inputs, cfg)
    out = dirs.plots / "caption" / method
    write_json_atomic(out / "captions.json",
                      {i: {"generated": generated[i], "references": inputs.captions[i]} for i in generated})
    rows = [{"image_path": inputs.image_paths[i], "generated": generated[i], "references": inputs.captions[i]}
            for i in inputs.image_ids[: cfg.evaluate.caption.examples]]
    write_examples_html(out / "examples.html", rows, f"Captions by the {method} bridge")
    write_metrics(dirs.metrics, "caption", method, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return method_stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
