"""Training throughput: step time, samples per second and model FLOPs utilisation (MFU).

MFU is the step's FLOPs over its time, as a share of this device's dense matmul rate in the
step's precision, measured when training starts (`matmul_rate`). The step's FLOPs are counted once,
on the first step a run takes, by torch's FlopCounterMode: every matmul of the frozen LLM's forward
and input-gradient backward, the bridge and the alignment scores. (torch has no FLOP formula for
its fused CPU attention kernel, so on CPU attention's own products are left out.) The first step
also warms up kernels and the allocator, so it is counted but not timed.
"""
from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Median FLOP/s of (size x size) @ (size x size) products on `device` in `dtype`, after 2 warm-ups."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


class Throughput:
    """Times each training step and turns it into dvclive rows under `throughput/`."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.peak = device, matmul_rate(device, dtype)
        self.flops: float | None = None  # per step, counted on the first
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def step(self) -> AbstractContextManager:
        """Around one whole step (forward, backward, optimizer): the first is counted, the others timed."""
        synchronize(self.device)
        self._start = time.perf_counter()
        if self.flops is None:
            self._counter = FlopCounterMode(display=False)
            return self._counter
        return nullcontext()

    def row(self, samples: int) -> dict[str, float] | None:
        """After the step: its throughput row, or None for the counted first step."""
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        if self.flops is None:
            self.flops = float(self._counter.get_total_flops())
            return None
        row = {"step_seconds": seconds, "samples_per_second": samples / seconds,
               "mfu": self.flops / seconds / self.peak}
        self.rows.append(row)
        return row

    def means(self) -> dict[str, float]:
        """Mean of each logged value, the step's counted FLOPs and the measured peak (empty before step 2)."""
        if not self.rows:
            return {}
        return {f"mean_{k}": statistics.fmean(r[k] for r in self.rows) for k in self.rows[0]} | {
            "step_gflop": self.flops / 1e9, "peak_gflop_per_second": self.peak / 1e9, "timed_steps": len(self.rows)}
