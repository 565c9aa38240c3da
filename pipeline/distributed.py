"""Data-parallel training across processes (torchrun): which part of each global batch is this process's.

`torchrun --nproc-per-node N -m stages.train --method vlap` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; each one trains on its own slice of every global batch and
DDP all-reduces the bridge's gradients. Losses are written as sums of per-rank shares that
add up to the one-process loss of the global batch, so N processes train the bridge that
one process would (docs/method.md#training-on-several-gpus).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


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
    use_cuda = (torch.cuda.is_available() and device_spec == "auto") or device_spec.startswith("cuda")
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
