"""How every bench measures: one timer, one reading of peak memory, one way to measure in a fresh process.

    from harness import time_call, time_calls, peak_rss_mib, children_peak_rss_mib, run_child, report

- time_call(fn, repeats, warmup) / time_calls(fns, ...): untimed warm-up calls, then `repeats` timed
  calls (several callables alternate, round by round, so all see the same machine load); the median and
  every sample. When this process uses a CUDA device, queued kernels are waited for before each clock
  read: they run asynchronously, and the clock would otherwise time only their launch. A measurement
  that cannot be repeated (a cold start, a one-off run) is one call: repeats=1, warmup=0.
- peak_rss_mib() / children_peak_rss_mib(): the peak resident memory of this process, and of the
  largest of its finished child processes (e.g. a DataLoader worker), from getrusage.
- run_child(script, *args) / report(record): a measurement in a fresh process of the same script (so
  its peak memory is its own); the child prints its record as a JSON line, the parent gets the dict.

Light on purpose: no torch import here (a child that only reports starts fast); CUDA is looked at only
where the bench itself imported torch.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass
class Timing:
    """The timed calls of one callable."""

    samples: list[float] = field(default_factory=list)  # seconds of each timed call, in order
    result: Any = None  # what the last call returned

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def total(self) -> float:
        return sum(self.samples)


def synchronize() -> None:
    """Wait for this process's queued CUDA work, where it has any (a no-op on a CPU-only run)."""
    torch = sys.modules.get("torch")
    # is_initialized: only a process that has touched CUDA can have work queued; asking otherwise would
    # create a CUDA context (slow, and fatal in a process forked later)
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _clock() -> float:
    """perf_counter after the device has caught up."""
    synchronize()
    return time.perf_counter()


def time_calls(fns: Sequence[Callable[[], Any]], repeats: int = 3, warmup: int = 1) -> list[Timing]:
    """Each of `fns` called `warmup` times untimed, then `repeats` times timed; round r calls every fn
    once, in order (warm-up rounds too), so each sees the load the others see."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    timings = [Timing() for _ in fns]
    for _ in range(warmup):
        for fn, timing in zip(fns, timings):
            timing.result = fn()
    for _ in range(repeats):
        for fn, timing in zip(fns, timings):
            start = _clock()
            timing.result = fn()
            timing.samples.append(_clock() - start)
    return timings


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """`fn` called `warmup` times untimed, then `repeats` times timed."""
    return time_calls([fn], repeats, warmup)[0]


# ru_maxrss is in KiB on Linux, in bytes on macOS
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT / 2**20


def children_peak_rss_mib() -> float:
    """Peak resident memory of the largest child process that has ended and been waited for, MiB (0 if none)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _RSS_UNIT / 2**20


class ChildFailed(RuntimeError):
    """A measuring child process exited non-zero (an error, or the kernel's OOM killer)."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        super().__init__(f"{' '.join(cmd)}: exit {returncode}\n{tail}")


def run_child(script: str | Path, *args: Any, env: dict[str, str] | None = None) -> dict:
    """`python script args...` in a fresh process; the JSON object on the last line of its stdout (what
    `report` printed there). Raises ChildFailed when the child exits non-zero."""
    cmd = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ChildFailed(cmd, proc.returncode, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ChildFailed(cmd, proc.returncode, proc.stderr + "\n(no JSON line on stdout)")
    return json.loads(lines[-1])


def report(record: dict) -> None:
    """The child's side of run_child: its measurement, one JSON line on stdout."""
    print(json.dumps(record), flush=True)
