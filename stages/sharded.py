"""The evaluations that cost the most (captioning, VQA, retrieval) on `evaluate.common.nproc_per_node` processes.

Its own module, imported by those three stages only: pipeline/distributed.py is in their code deps, not in
every stage's (stages/common.py is in every stage's).
"""
from __future__ import annotations

import json
from typing import Callable

from pipeline import distributed
from pipeline.config import Config
from pipeline.paths import Dirs
from stages.common import LOCKS_HELD_BY, StageSpec


def run_sharded(spec: StageSpec, cfg: Config, dirs: Dirs, method: str, task: str,
                evaluate_shard: Callable[[distributed.Ranks], dict]) -> dict:
    """An evaluation on `evaluate.common.nproc_per_node` processes. Outside torchrun with more than one, the stage
    starts itself under torchrun (this process holds the locks, its ranks take none) and returns the metrics rank 0
    wrote to data/metrics/<task>/<method>.json. Otherwise this process runs `evaluate_shard(ranks)` on its shard;
    rank 0 writes every output while the other ranks wait."""
    common = cfg.evaluate.common
    launch = distributed.Launch.of(common, "evaluate.common")
    if launch.world > 1 and not distributed.launched():
        distributed.check_devices(common.device, launch)
        distributed.launch_stage(launch, f"stages.{spec.name}", cfg, dirs.root, method, spec.label(method),
                                 env={LOCKS_HELD_BY: spec.label(method)})
        return json.loads((dirs.metrics / task / f"{method}.json").read_text())
    ranks, _ = distributed.start(common.device)
    try:
        result = evaluate_shard(ranks)
        distributed.barrier()  # the other ranks wait while rank 0 writes
        return result
    finally:
        distributed.stop()
