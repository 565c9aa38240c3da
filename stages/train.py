"""Train stage: fit the linear bridge for one method (vlap | limber | contrastive) on cached features.

Reads  data/features (train split), data/prototypes, data/prepared/train.parquet,
       params `train.*`, `methods.<method>.*` (and the LLM named by `prototypes.llm`).
Writes the bridge data/models/<method>/ (model.safetensors + config.json), dvclive curves in data/metrics/train/<method>;
       an interrupted run resumes from data/models/checkpoints/<method>.safetensors. Throughput (step time, samples/s,
       MFU) goes to dvclive in data/reports/train/<method>/ (in no output: timing differs run to run).

    python -m stages.train --method vlap
    python -m stages.train --method vlap --node-rank 1          # train.nnodes > 1: another machine joins

With train.nproc_per_node (or train.nnodes) > 1 the stage starts that many processes under torchrun itself and
waits for them: data-parallel (DDP), rank 0 writes, and `dvc repro`, `dvc exp run` and the flow record it.
`torchrun --nproc-per-node 4 -m stages.train --method vlap` by hand trains on the processes torchrun gives it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline import distributed
from pipeline.config import Config, plain
from pipeline.device import resolve_device
from pipeline.errors import ConfigError
from pipeline.lms import LanguageModel, load_lm
from pipeline.paths import Dirs
from pipeline.prototypes import check_prototypes_match, load_prototypes, prototypes_file
from pipeline.train import checkpoint_file, load_train_data, run_length, train_bridge
from pipeline.validation import load_validation_set
from stages.common import LOCKS_HELD_BY, Out, StageSpec, remove_leftover_temps, run_stage, stage_main

STAGE = StageSpec(
    name="train", description=__doc__.splitlines()[0], per_method=True,
    params=("train", "prototypes.llm", "methods.{method}"),
    deps=("prepared", "features", "prototypes"),
    outs=(Out("models/{method}/model.safetensors"), Out("models/{method}/config.json"),
          Out("metrics/train/{method}/metrics.json", kind="metrics", cache=False),
          Out("metrics/train/{method}/plots/metrics", kind="plots", cache=False, x="step")),
)
log = logging.getLogger("stages.train")
MODULE = "stages.train"  # what the launched processes run (`python -m stages.train` names this module __main__)


def run(cfg: Config, dirs: Dirs, method: str, *, lm: LanguageModel | None = None,
        stop_after: int | None = None, until=None) -> dict:
    """Train one method; `stop_after` ends the run after that many steps, as an interruption would;
    `until(history)` may end it at a validation point (pipeline.train.train_bridge).
    Where train.* asks for more than one process, this process launches them (on_processes)."""
    launch = distributed.Launch.of(cfg.train)
    if launch.world > 1 and not distributed.launched():
        if until is None and stop_after is None:
            return on_processes(cfg, dirs, method, launch)
        log.info("train %s: in one process: a run stopped early (`until`, `stop_after`) is decided by one process, "
                 "not the %d of train.nproc_per_node x train.nnodes", method, launch.world)
    ranks, device = distributed.start(cfg.train.device)
    try:
        train_data = load_train_data(cfg, dirs)
        lm = lm or load_lm(cfg.prototypes.llm, resolve_device(device))
        protos = load_prototypes(prototypes_file(dirs.prototypes), lm.device)
        check_prototypes_match(protos, lm)
        steps, _ = run_length(cfg.train, len(train_data.rows))
        log.info("train %s: %d samples, %d steps of %d on %d process(es)", method, len(train_data.captions), steps,
                 cfg.train.batch_size, ranks.world)
        checkpoint = checkpoint_file(dirs.models, method)  # not a DVC out: survives a re-run
        if ranks.is_main:  # rank 0 writes the checkpoint: a killed run's unfinished write of it is left
            remove_leftover_temps([checkpoint])
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


def on_processes(cfg: Config, dirs: Dirs, method: str, launch: distributed.Launch) -> dict:
    """Train under torchrun on launch.world processes, this machine's started and waited for here (node 0).
    They read `cfg` from a params file written for them; rank 0 writes the outputs, whose locks this process
    holds (run_stage), and the bridge's config.json gives the result."""
    # bad input fails here in one line, before any process starts
    data = load_train_data(cfg, dirs)
    distributed.check_batch(cfg.train.batch_size, len(data.rows), distributed.Ranks(0, launch.world))
    distributed.check_devices(cfg.train.device, launch)
    label = STAGE.label(method)
    log.info("train %s: launching %d process(es) on each of %d machine(s) under torchrun", method,
             launch.nproc_per_node, launch.nnodes)
    with tempfile.TemporaryDirectory(prefix="vlap-train-") as tmp:
        params = Path(tmp) / "params.yaml"  # the config as given (the flow's, a study's), whatever file it came from
        params.write_text(yaml.safe_dump({k: v for k, v in plain(cfg).items() if k != "preset"}, sort_keys=False))
        distributed.launch(launch, 0, MODULE, ["--method", method, "--params", str(params),
                                                 "--data", str(dirs.root.resolve())],
                           what=label, env={LOCKS_HELD_BY: label})
    meta = json.loads((dirs.models / method / "config.json").read_text())
    return {"finished": True, "steps": meta["steps"], "processes": meta["processes"], "final": meta["final"]}


def join(cfg: Config, dirs: Dirs, method: str, node_rank: int, params: Path) -> None:
    """This machine's part of a multi-node run that node 0 (`dvc repro`, the flow) started: its processes
    under torchrun, which write nothing (rank 0 is on node 0), so no output lock is taken."""
    launch = distributed.Launch.of(cfg.train)
    if not 0 < node_rank < launch.nnodes:
        raise ConfigError(f"--node-rank {node_rank}: expected 1 to {launch.nnodes - 1} (train.nnodes: "
                          f"{launch.nnodes}; node 0 is the machine that runs dvc repro or the flow)")
    distributed.check_devices(cfg.train.device, launch)
    distributed.launch(launch, node_rank, MODULE, ["--method", method, "--params", str(params.resolve()),
                                                     "--data", str(dirs.root.resolve())],
                       what=f"{STAGE.label(method)} node {node_rank}")


NODE_RANK = argparse.ArgumentParser(add_help=False)
NODE_RANK.add_argument("--node-rank", type=int, default=0, metavar="K",
                       help="train.nnodes > 1: this machine's node rank; 0 (default) is the machine that runs the "
                            "stage (dvc repro, the flow) and writes its outputs, the others join with 1, 2, ...")


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace, cfg: Config, dirs: Dirs):
        if args.node_rank:
            return join(cfg, dirs, args.method, args.node_rank, Path(args.params))
        return run_stage(sys.modules[__name__], cfg, dirs, args.method)

    return stage_main(sys.modules[__name__], argv, parents=(NODE_RANK,), body=body)


if __name__ == "__main__":
    sys.exit(main())
