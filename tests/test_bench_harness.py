"""bench/harness.py, the timer and memory readings every bench reports through."""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# loaded from its file: bench/ is a folder of scripts, not a package on the path
_spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "harness.py")
harness = sys.modules["bench_harness"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(harness)


def test_warm_up_calls_are_run_but_not_timed():
    calls = []

    def work() -> int:
        calls.append(len(calls))
        time.sleep(0.25 if len(calls) <= 2 else 0.01)  # the two warm-up calls are the slow ones
        return len(calls)

    timing = harness.time_call(work, repeats=3, warmup=2)
    assert len(calls) == 5  # 2 warm-up + 3 timed
    assert len(timing.samples) == 3
    assert all(0.01 <= s < 0.2 for s in timing.samples), timing.samples
    assert timing.median == statistics.median(timing.samples)
    assert timing.total == pytest.approx(sum(timing.samples))
    assert timing.result == 5  # the last call's return value


def test_callables_alternate_round_by_round():
    order = []
    a, b = harness.time_calls([lambda: order.append("a"), lambda: order.append("b")], repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert len(a.samples) == len(b.samples) == 3


def test_a_one_shot_measurement_and_bad_counts():
    once = harness.time_call(lambda: sum(range(100_000)), repeats=1, warmup=0)
    assert len(once.samples) == 1 and once.median > 0 and once.result == sum(range(100_000))
    with pytest.raises(ValueError):
        harness.time_call(lambda: None, repeats=0)


def test_peak_rss_and_a_child_measurement_round_trip(tmp_path):
    assert harness.peak_rss_mib() > 1  # this interpreter alone holds more than a MiB
    script = tmp_path / "child.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import harness\n"
        "print('progress lines before the record are ignored')\n"
        "ballast = bytearray(64 * 2**20)  # touched below, so resident\n"
        "ballast[::4096] = b'x' * len(ballast[::4096])\n"
        "harness.report({'args': sys.argv[1:], 'peak_rss_mib': harness.peak_rss_mib()})\n")
    record = harness.run_child(script, "--size", 3, tmp_path)
    assert record["args"] == ["--size", "3", str(tmp_path)]
    assert record["peak_rss_mib"] > 64
    # the child has ended and been waited for: the children's peak counts it
    assert harness.children_peak_rss_mib() >= 64

    failing = tmp_path / "failing.py"
    failing.write_text("import sys\nprint('out of memory', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(harness.ChildFailed) as err:
        harness.run_child(failing)
    assert err.value.returncode == 3 and "out of memory" in str(err.value)


def test_no_cuda_context_is_created_on_a_cpu_run():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_initialized():
        pytest.skip("this process already uses CUDA")
    harness.time_call(lambda: torch.ones(4).sum(), repeats=2, warmup=1)
    assert not torch.cuda.is_initialized()
