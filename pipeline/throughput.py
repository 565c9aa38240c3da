"""Training throughput: step time, samples per second and model FLOPs utilisation (MFU).

MFU is the step's FLOPs over its time, as a share of this device's dense matmul rate in the
step's precision, measured when training starts (`matmul_rate`, the best of a few large products).
The step's FLOPs are counted once, before training, on a dry run of the first batch's forward and
backward, with torch's own FLOP formulas (torch.utils.flop_counter's registry, as FlopCounterMode
uses them, but without its per-module tracking, whose hooks crashed the interpreter in garbage
collection): every matmul of the frozen LLM's forward and input-gradient backward, the bridge and
the alignment scores. (torch has no FLOP formula for its
fused CPU attention kernel, so on CPU attention's own products are left out.) The dry run's
gradients are discarded: counting under a dispatch mode changes the last bits of some backward
kernels, and the real steps must stay bit-identical to a run that is not measured.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """Sums the FLOPs of every op torch has a FLOP formula for (matmuls, convolutions, attention) run
    inside it."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache  # once per process: a study or a tuning grid trains many bridges on one device
def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 4, seconds: float = 0.05) -> float:
    """Best FLOP/s of (n x n) @ (n x n) products on `device` in `dtype`, after one warm-up.

    n doubles from 256 while one product takes under `seconds`, up to 2048 on CPU and 8192 on a GPU: large
    enough to reach the dense rate, and bounded in time where a dtype has no fast kernel (bf16 on a CPU
    without native bf16 runs at well under 1 GFLOP/s, where a 2048^3 product alone would take a minute).
    """
    largest = 8192 if device.type == "cuda" else 2048
    size, best = 256, float("inf")
    while True:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(size, size, device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = min(times[1:])
        if size >= largest or best >= seconds:
            return 2 * size**3 / best
        size *= 2


class Throughput:
    """Times each training step and turns it into dvclive rows under `throughput/`."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.peak = device, matmul_rate(device, dtype)
        self.flops = 0.0
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def count(self, forward_backward: Callable[[], None]) -> None:
        """The FLOPs of one step, from a dry run of its forward and backward (gradients discarded by the caller)."""
        with FlopCount() as counter:
            forward_backward()
        self.flops = float(counter.total)

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def row(self, samples: int) -> dict[str, float]:
        """After a step (forward, backward, optimizer): its throughput row."""
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        row = {"step_seconds": seconds, "samples_per_second": samples / seconds, "mfu": self.flops / seconds / self.peak}
        self.rows.append(row)
        return row

    def means(self) -> dict[str, float]:
        """Mean of each logged value, the step's counted FLOPs and the measured peak (empty before a step)."""
        if not self.rows:
            return {}
        return {f"mean_{k}": statistics.fmean(r[k] for r in self.rows) for k in self.rows[0]} | {
            "step_gflop": self.flops / 1e9, "peak_gflop_per_second": self.peak / 1e9, "timed_steps": len(self.rows)}
