"""Data-parallel training across processes (torchrun): which part of each global batch is this process's.

`torchrun --nproc-per-node N -m stages.train --method vlap` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; each one trains on its own slice of every global batch and
DDP all-reduces the bridge's gradients. Losses are written as sums of per-rank shares that
add up to the one-process loss of the global batch, so N processes train the bridge that
one process would (docs/method.md#training-on-several-gpus).

`train.nproc_per_node` / `train.nnodes` > 1 make the train stage start those processes itself (`launch`),
so `dvc repro`, `dvc exp run` and the Prefect flow train on N processes and record the bridge rank 0 wrote.

`evaluate.common.nproc_per_node` > 1 does the same for the evaluations that cost the most (captioning, VQA,
retrieval): each rank works through its `shard` of the evaluation's batches, `gather_in_order` puts the results
back in the items' order on rank 0, and rank 0 alone scores them and writes: the outputs of one process.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
import yaml

from pipeline.errors import ConfigError, UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoint, the logs and the bridge."""
        return self.rank == 0

    def local_part(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch whose size the world divides."""
        size = global_batch.shape[0] // self.world
        return global_batch[self.rank * size : (self.rank + 1) * size]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order (B, ...), without gradient: targets and frozen sides."""
        if self.world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        return torch.cat(parts)

    def gather_with_grad(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order; the gradient of each rank's rows flows back to that rank."""
        if self.world == 1:
            return local
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(local.contiguous()))

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over ranks, in place (no gradient): a sharded reduction's partial results."""
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_max(self, value: torch.Tensor) -> torch.Tensor:
        """`value`'s elementwise maximum over ranks, in place (no gradient)."""
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a detached value (a count, a loss share)."""
        if self.world == 1:
            return value.detach()
        out = value.detach().clone()
        dist.all_reduce(out)
        return out


def start(device_spec: str) -> tuple[Ranks, str]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); returns the ranks and
    the device this process trains on (its LOCAL_RANK's GPU under torchrun, else `device_spec`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device_spec
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = uses_cuda(device_spec)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_spec = f"cuda:{local_rank}"
    elif device_spec == "auto":
        device_spec = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Ranks(rank, world), device_spec


def check_batch(batch_size: int, n_samples: int, ranks: Ranks) -> None:
    """Every rank needs an equal, non-empty part of every global batch."""
    if ranks.world == 1:
        return
    if batch_size % ranks.world or n_samples < batch_size:
        raise ConfigError(f"params.yaml: train.batch_size: {batch_size} must be a multiple of the {ranks.world} "
                          f"torchrun processes and at most the {n_samples} training samples")


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


T = TypeVar("T")


def shard(items: Sequence[T], ranks: Ranks) -> Sequence[T]:
    """This rank's contiguous part of `items` (the batches of an evaluation, say): the parts of rank 0, 1, ...
    follow each other, their sizes differ by one at most, and a rank may get none when items are fewer than ranks."""
    n = len(items)
    return items[n * ranks.rank // ranks.world : n * (ranks.rank + 1) // ranks.world]


def gather_in_order(local: list[T], ranks: Ranks) -> list[T] | None:
    """Every rank's results for its `shard`, joined in rank order, i.e. the order of the items sharded, on
    rank 0; None on the other ranks. Each rank's `local` is pickled (gather_object): keep tensors in it on the CPU."""
    if ranks.world == 1:
        return list(local)
    parts: list[Any] | None = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(list(local), parts, dst=0)
    return [x for part in parts for x in part] if parts is not None else None


def uses_cuda(device_spec: str) -> bool:
    """Whether processes given `device_spec` train on GPUs (one each, by LOCAL_RANK)."""
    return (torch.cuda.is_available() and device_spec == "auto") or device_spec.startswith("cuda")


# ---------------------------------------------------------------- launching the processes from the stage
# The train.* keys that say how many processes train, not what they train: left out of the bridge's config.json
# (its "processes" tells the count) and of the resume fingerprint, so the one-process bridge's files are what they
# were before these keys existed, and a checkpoint resumes under another process count.
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint")
log = logging.getLogger("pipeline.distributed")
BAD_INPUT = 2  # a stage's exit code for bad input (pipeline.errors.report_user_errors)
ROOT = Path(__file__).resolve().parents[1]  # holds pipeline/ and stages/: what the launched processes import


def without_launch(train_values: dict) -> dict:
    """train.* values less LAUNCH_KEYS."""
    return {k: v for k, v in train_values.items() if k not in LAUNCH_KEYS}


@dataclass(frozen=True)
class Launch:
    """How many processes run a stage: <section>.nproc_per_node on each of <section>.nnodes machines
    (train.*; an evaluation runs on one machine)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""
    section: str = "train"  # the params section it was read from, which error lines name

    @classmethod
    def of(cls, section_cfg, section: str = "train") -> "Launch":
        """From a params section with nproc_per_node (and nnodes, rdzv_endpoint where it has them); every field
        is read (they are the stage's declared params), bad ones in one line."""
        names = {f.name for f in dataclasses.fields(section_cfg)}
        multi_node = (section_cfg.nnodes, section_cfg.rdzv_endpoint) if {"nnodes", "rdzv_endpoint"} <= names else ()
        launch = cls(section_cfg.nproc_per_node, *multi_node, section=section)
        if launch.nnodes > 1:
            host, _, port = launch.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"params.yaml: {section}.rdzv_endpoint: expected host:port on node 0 (the machine "
                                  f"that runs dvc repro or the flow), which {section}.nnodes {launch.nnodes} needs; "
                                  f"got {launch.rdzv_endpoint!r}")
        return launch

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes


def launched() -> bool:
    """Whether this process is one of torchrun's (started by `launch`, or by hand): it trains, never launches."""
    return "WORLD_SIZE" in os.environ


def check_devices(device_spec: str, launch: Launch) -> None:
    """One GPU for each of this machine's processes, where they run on GPUs."""
    s = launch.section
    if uses_cuda(device_spec) and launch.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(f"params.yaml: {s}.nproc_per_node: {launch.nproc_per_node} processes take one GPU each, "
                          f"and this machine has {torch.cuda.device_count()} ({s}.device: {device_spec})")
    if s != "train" and launch.world > 1 and device_spec.startswith("cuda:"):
        # an evaluation's processes put their tensors on `device_spec`: one named GPU would take them all
        raise ConfigError(f"params.yaml: {s}.device: {device_spec} names one GPU, and {s}.nproc_per_node "
                          f"{launch.nproc_per_node} processes take one GPU each: use auto or cuda")


def torchrun_args(spec: Launch, node_rank: int) -> list[str]:
    args = [f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.nnodes == 1:
        # a rendezvous on a free port of this machine: runs side by side (queued experiments, flow workers) never meet
        return args + ["--standalone"]
    # static rendezvous: node K's processes are ranks K * nproc_per_node.., so rank 0, which writes, is on node 0
    # (c10d's dynamic rendezvous numbers the nodes in the order they join)
    return args + [f"--nnodes={spec.nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                   f"--rdzv-endpoint={spec.rdzv_endpoint}"]


def launch(spec: Launch, node_rank: int, module: str, args: list[str], what: str,
           env: dict[str, str] | None = None) -> None:
    """Run `python -m module args` in spec.nproc_per_node processes on this machine under torchrun (node
    `node_rank` of spec.nnodes) and wait for them. They print their own errors; a failure raises one line
    here, a UserError when they stopped on bad input."""
    # this checkout's code (a queued experiment's copy too), from the working folder relative params are read from
    child_env = os.environ | (env or {}) | {"PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # the machine's cores shared among its processes (torchrun would give each one thread)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, cores // spec.nproc_per_node)))
    # a launcher process of our own (torchrun's machinery, below): the flow's threads and workers stay out of it
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.distributed", *torchrun_args(spec, node_rank),
                             "-m", module, *args], env=child_env)
    try:
        code = proc.wait()
    except BaseException:  # interrupted: torchrun stops its processes on SIGTERM
        proc.terminate()
        proc.wait()
        raise
    if code == BAD_INPUT:
        raise UserError(f"{what}: its {spec.world} torchrun processes stopped on bad input (their error lines above)")
    if code:
        raise RuntimeError(f"{what}: its torchrun processes failed (exit code {code}; their errors are above)")


def launch_stage(spec: Launch, module: str, cfg, data_root: Path, method: str | None, what: str,
                 env: dict[str, str] | None = None) -> None:
    """`launch` stage `module` (`python -m module`) on this machine's spec.nproc_per_node processes, which read
    `cfg` from a params file written for them (the config as given: the flow's, a study's, whatever file it came
    from) and the stage folders under `data_root`; waits for them."""
    from pipeline.config import plain  # pipeline.config imports the methods, whose losses import this module

    log.info("%s: launching %d processes under torchrun", what, spec.nproc_per_node)
    with tempfile.TemporaryDirectory(prefix="vlap-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump({k: v for k, v in plain(cfg).items() if k != "preset"}, sort_keys=False))
        args = ["--params", str(params), "--data", str(Path(data_root).resolve())]
        launch(spec, 0, module, args + (["--method", method] if method else []), what=what, env=env)


def _launcher(argv: list[str]) -> int:
    """torchrun's launcher (`torch.distributed.run`) with the exit code a stage gives: BAD_INPUT when the
    processes stopped on bad input, else 1; and it stops its processes when its parent goes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    def stop_with_parent(parent: int) -> None:
        # a parent killed outright (SIGKILL) cannot stop us: without this its processes would train on and write
        # outputs nobody holds the locks of
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's handler stops the processes

    threading.Thread(target=stop_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        # the first process to fail tells why; torchrun then stopped the others (their SIGTERM is listed too)
        return BAD_INPUT if err.get_first_failure()[1].exitcode == BAD_INPUT else 1
    return 0


if __name__ == "__main__":
    sys.exit(_launcher(sys.argv[1:]))
