"""Benchmark: data-parallel training (torchrun, gloo on CPU) against one process, same global batch.

    python bench/ddp.py [--processes 2] [--steps 10 30] [--method vlap] [--precision fp32]

Runs the train stage on the default run's cached inputs (data/prepared, data/features,
data/prototypes must exist: `dvc repro extract prototypes`) in a temporary data root, once as
`python -m stages.train` and once as `torchrun --nproc-per-node P -m stages.train`, each at two
step counts. The per-step time is the difference of the two wall times divided by the step
difference, so start-up (interpreters, LLM loads, process group) cancels out. Prints both
per-step times, their ratio, and the largest difference between the two trained bridges.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import yaml  # noqa: E402

from harness import time_call  # noqa: E402
from pipeline.bridge import load_bridge  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402


def run(params: Path, root: Path, method: str, processes: int) -> float:
    Dirs().sharing_inputs(root)
    python = Path(sys.executable)
    cmd = ([python.parent / "torchrun", "--standalone", f"--nproc-per-node={processes}"] if processes > 1
           else [python]) + ["-m", "stages.train", "--method", method, "--params", str(params), "--data", str(root)]
    threads = max(1, (os.cpu_count() or 1) // processes)  # the same cores either way
    # one wall time per run: the start-up it includes cancels out between the two step counts (main)
    return time_call(lambda: subprocess.run(cmd, check=True, capture_output=True,
                                            env=os.environ | {"OMP_NUM_THREADS": str(threads)}),
                     repeats=1, warmup=0).median


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, nargs=2, default=(10, 30))
    p.add_argument("--method", default="vlap")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="train.precision (default: params)")
    args = p.parse_args()
    if not (Dirs().features / "index.json").exists():
        print("bench/ddp.py: run `dvc repro extract prototypes` first (needs the default's cached inputs)",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    raw = yaml.safe_load(Path("params.yaml").read_text())
    walls = {}
    for steps in args.steps:
        params = tmp / f"params-{steps}.yaml"
        raw["train"] |= {"steps": steps, "checkpoint_every": steps, "device": "cpu"}
        if args.precision:
            raw["train"]["precision"] = args.precision
        params.write_text(yaml.safe_dump(raw))
        for processes in (1, args.processes):
            walls[steps, processes] = run(params, tmp / f"{steps}-{processes}", args.method, processes)
            print(f"{steps} steps, {processes} process(es): {walls[steps, processes]:.1f} s", flush=True)
    (lo, hi), per_step = args.steps, {}
    for processes in (1, args.processes):
        per_step[processes] = (walls[hi, processes] - walls[lo, processes]) / (hi - lo)
    one, many = (load_bridge(tmp / f"{hi}-{n}" / "models" / args.method)[0].proj.weight
                 for n in (1, args.processes))
    print(f"per step: 1 process {per_step[1]:.3f} s, {args.processes} processes {per_step[args.processes]:.3f} s, "
          f"ratio {per_step[1] / per_step[args.processes]:.2f}x (>1: data-parallel is faster)")
    print(f"max |bridge weight difference| after {hi} steps: {(one - many).abs().max().item():.2e} "
          f"(largest weight {one.abs().max().item():.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
