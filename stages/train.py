"""Train stage: fit the linear bridge for one method (vlap | limber | contrastive) on cached features.

Reads  data/features (train split), data/prototypes, data/prepared/train.parquet,
       params `train.*`, `methods.<method>.*` (and the LLM named by `prototypes.llm`).
Writes the bridge data/models/<method>/ (model.safetensors + config.json), dvclive curves in data/metrics/train/<method>;
       an interrupted run resumes from data/models/checkpoints/<method>.pt. Throughput (step time, samples/s,
       MFU) goes to dvclive in data/reports/train/<method>/ (in no output: timing differs run to run).

    python -m stages.train --method vlap
    torchrun --nproc-per-node 4 -m stages.train --method vlap   # data-parallel (DDP); rank 0 writes
"""
from __future__ import annotations

import logging
import sys

from pipeline import distributed
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.lms import LanguageModel, load_lm
from pipeline.paths import Dirs
from pipeline.prototypes import check_prototypes_match, load_prototypes, prototypes_file
from pipeline.train import load_train_data, run_length, train_bridge
from pipeline.validation import load_validation_set
from stages.common import Out, StageSpec, stage_main

STAGE = StageSpec(
    name="train", description=__doc__.splitlines()[0], per_method=True,
    params=("train", "prototypes.llm", "methods.{method}"),
    deps=("prepared", "features", "prototypes"),
    outs=(Out("models/{method}/model.safetensors"), Out("models/{method}/config.json"),
          Out("metrics/train/{method}/metrics.json", kind="metrics", cache=False),
          Out("metrics/train/{method}/plots/metrics", kind="plots", cache=False, x="step")),
)
log = logging.getLogger("stages.train")


def run(cfg: Config, dirs: Dirs, method: str, *, lm: LanguageModel | None = None,
        stop_after: int | None = None, until=None) -> dict:
    """Train one method; `stop_after` ends the run after that many steps, as an interruption would;
    `until(history)` may end it at a validation point (pipeline.train.train_bridge)."""
    ranks, device = distributed.start(cfg.train.device)
    try:
        train_data = load_train_data(cfg, dirs)
        lm = lm or load_lm(cfg.prototypes.llm, resolve_device(device))
        protos = load_prototypes(prototypes_file(dirs.prototypes), lm.device)
        check_prototypes_match(protos, lm)
        steps, _ = run_length(cfg.train, len(train_data.rows))
        log.info("train %s: %d samples, %d steps of %d on %d process(es)", method, len(train_data.captions), steps,
                 cfg.train.batch_size, ranks.world)
        checkpoint = dirs.models / "checkpoints" / f"{method}.pt"  # not a DVC out: survives a re-run
        result = train_bridge(method, cfg, train_data, lm, protos, dirs.models / method,
                              dirs.metrics / "train" / method, dirs.reports / "train" / method, checkpoint,
                              stop_after=stop_after, ranks=ranks, until=until,
                              val=load_validation_set(cfg, dirs, protos) if ranks.is_main else None)
        # The other ranks wait while rank 0 writes, so no process group is torn down under a live one
        # (a rank leaving early was seen to abort at exit: "terminate called without an active exception").
        distributed.barrier()
        return result
    finally:
        distributed.stop()


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
