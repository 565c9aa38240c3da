"""Benchmark: the AP loss's Sinkhorn under data parallelism, sharded (each rank its own rows, column
sums all-reduced) against gathering the whole score matrix to every rank, at the paper's sizes.

    python bench/sinkhorn_sharded.py [--batch 2048] [--words 49152] [--dim 576] [--ranks 1 2 4 8]
                                     [--gathered-ranks 1 2 4]

Each setting runs W gloo processes on this CPU (simulated ranks: the bench measures memory and
traffic, not speed), or with --device cuda W processes on the GPUs (NCCL with a GPU per rank, else
gloo on CUDA tensors sharing one GPU; peak = GPU memory the solve allocates). Every rank builds its
rows of the two OT problems of one step (visual and text scores, (2, B/W, K) float32: cosines of
random unit vectors in --dim dimensions; at SmolLM2's 576 a row spans ~0.4, i.e. 40 ε, the float32
kernel training takes; at 64 ~1.3, the float64 kernel), then solves them with ε = 0.01 and 3 iterations:
- sharded: `pipeline.ot.sinkhorn(local rows, ranks=...)`, what training runs;
- gathered (the reference, what training ran before): all-gather the scores to (2, B, K) on every
  rank, solve the whole problem there, keep this rank's rows.
Per rank it reports the peak resident memory the solve adds (Linux VmHWM, reset before the solve)
and the tensor bytes it hands to collectives (all_gather / all_reduce payloads), and checks that
both give the same rows (max abs difference).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from harness import time_call  # noqa: E402
from pipeline.distributed import Ranks  # noqa: E402
from pipeline.ot import sinkhorn  # noqa: E402

EPSILON, ITERS = 0.01, 3


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class Traffic:
    """Counts the bytes of every tensor handed to all_reduce / all_gather in this process."""

    def __init__(self):
        self.bytes = 0
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

        def all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._reduce(tensor, *args, **kwargs)

        def all_gather(parts, tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._gather(parts, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def scores_rows(rank: int, rows: int, words: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (2, rows, K) scores and the (K,) prior, the same on every run of the bench."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(words, dim, generator=g), dim=-1)
    mu = torch.rand(words, generator=g) ** 4
    g.manual_seed(1 + rank)
    z = torch.nn.functional.normalize(torch.randn(2, rows, dim, generator=g), dim=-1)
    return z @ prototypes.T, mu / mu.sum()


def worker(rank: int, world: int, mode: str, batch: int, words: int, dim: int, store: str, out: str,
           device: str) -> None:
    torch.set_num_threads(1)
    cuda = device == "cuda"
    # NCCL needs a GPU per rank; with fewer GPUs the ranks share one through gloo (which takes CUDA tensors)
    nccl = cuda and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank if nccl else 0)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ranks = Ranks(rank, world)
    scores, mu = (t.to(torch.device("cuda") if cuda else "cpu") for t in scores_rows(rank, batch // world, words, dim))
    span = ranks.all_max((scores.amax(-1) - scores.amin(-1)).max() / EPSILON).item()  # on the scores' device: NCCL
    traffic = Traffic()
    dist.barrier()
    if cuda:  # the memory that matters is the GPU's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1024
    else:
        # hand freed memory back first (the stages keep it, common.py), or the solve could reuse pages
        # already resident and its peak would not show
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        base = vm_kb("VmRSS")

    def solve() -> torch.Tensor:
        if mode == "sharded":
            return sinkhorn(scores, mu, EPSILON, ITERS, ranks).assignments
        parts = [torch.empty_like(scores) for _ in range(world)]
        dist.all_gather(parts, scores.contiguous())
        whole = sinkhorn(torch.cat(parts, -2), mu, EPSILON, ITERS).assignments  # (2, B, K) on every rank
        rows = batch // world
        return whole[..., rank * rows:(rank + 1) * rows, :].clone()  # `whole` is freed on return

    # one timed call: the peak memory and the traffic counted are those of one solve
    solved = time_call(solve, repeats=1, warmup=0)
    plan, seconds = solved.result, solved.median
    peak = (torch.cuda.max_memory_allocated() / 1024 if cuda else vm_kb("VmHWM")) - base
    torch.save(plan.cpu(), f"{out}/{mode}-{world}-{rank}.pt")
    Path(f"{out}/{mode}-{world}-{rank}.json").write_text(json.dumps(
        {"peak_gb": peak / 2**20, "bytes": traffic.bytes, "seconds": seconds, "backend": dist.get_backend(),
         "span": span}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--words", type=int, default=49152)
    p.add_argument("--dim", type=int, default=576, help="dimension of the random unit vectors behind the scores")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--gathered-ranks", type=int, nargs="+", default=[1, 2, 4],
                   help="worlds to run the gathered reference at (each rank holds the whole problem)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    print(f"torch {torch.__version__}, {args.device}, B={args.batch}, K={args.words}, D={args.dim}, "
          f"two OT problems per step, eps={EPSILON}, {ITERS} iterations; per rank: peak memory the solve adds, "
          "bytes handed to collectives")
    print("| ranks | solve | backend | widest row span / eps | per-rank peak (GB) | "
          "per-rank collective bytes / step (MB) | seconds | max abs diff from sharded |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for world in sorted(set(args.ranks) | set(args.gathered_ranks)):
            for mode in ("sharded", "gathered"):
                if world not in (args.ranks if mode == "sharded" else args.gathered_ranks):
                    continue
                store = os.path.join(tmp, f"store-{mode}-{world}")
                mp.spawn(worker, args=(world, mode, args.batch, args.words, args.dim, store, tmp, args.device),
                         nprocs=world)
                stats = [json.loads(Path(f"{tmp}/{mode}-{world}-{r}.json").read_text()) for r in range(world)]
                diff = "–"
                if mode == "gathered" and world in args.ranks:
                    diff = max((torch.load(f"{tmp}/gathered-{world}-{r}.pt") -
                                torch.load(f"{tmp}/sharded-{world}-{r}.pt")).abs().max().item() for r in range(world))
                    diff = f"{diff:.1e}"
                print(f"| {world} | {mode} | {stats[0]['backend']} | {stats[0]['span']:.1f} | "
                      f"{max(s['peak_gb'] for s in stats):.2f} | "
                      f"{max(s['bytes'] for s in stats) / 2**20:.2f} | {max(s['seconds'] for s in stats):.3f} | "
                      f"{diff} |", flush=True)


if __name__ == "__main__":
    main()
