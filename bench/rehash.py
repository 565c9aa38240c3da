"""Benchmark: what a stage run spends on its data inputs before it runs, in a queued DVC experiment's
temporary workspace: the inputs' file stamps (stages.common.whole_config_and_deps_digest now) vs their
content hash where the digest table does not know the paths (what it hashed before), same files, same run.

    python bench/rehash.py [--data data] [--stage evaluate_caption] [--method vlap] [--repeats 3]

DVC runs each queued experiment (`dvc exp run --queue`, `vlap ablate`) in a new temporary copy of the
repo, so every path there is new to the digest table (pipeline/digests.py): before, the first stage of
each experiment that read data/features hashed all of it, the others found it in the table until the
copy was deleted. The reference is that cold hash (a fresh table); the stamps read no file. Prints the
inputs' size, the seconds of each, the ratio, and from the measured hashing rate an estimate for the
paper's feature cache (250 GB, CLIP ViT-B/32 on CC3M; README) per queued experiment: an estimate from the
rate, not a measurement of 250 GB.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root)

from harness import time_call
from pipeline.config import Config, load_config
from pipeline.digests import tree_digest
from pipeline.paths import Dirs
from stages.common import whole_config_and_deps_digest
from stages.graph import graph

PAPER_FEATURES_BYTES = 250e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--stage", default="evaluate_caption")
    p.add_argument("--method", default="vlap")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.params) if args.params.exists() else Config()
    dirs = Dirs.under(args.data)
    node = next(n for n in graph() if n.spec.name == args.stage)
    method = args.method if node.spec.per_method else None
    deps = [d for d in node.spec.dep_paths(dirs, method) if d.exists()]
    files = [f for d in deps for f in ([d] if d.is_file() else d.rglob("*")) if f.is_file()]
    size = sum(f.stat().st_size for f in files)

    def content_cold() -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:  # a table that knows none of the paths: a new workspace
            return [tree_digest(d, Path(tmp) / "digests.json") for d in deps]

    # the content hash reads every byte on each call: no untimed warm-up (the page cache is warm for both)
    before = time_call(content_cold, repeats=args.repeats, warmup=0).median
    after = time_call(lambda: whole_config_and_deps_digest(node.spec, method, cfg, dirs),
                      repeats=args.repeats, warmup=1).median
    rate = size / before
    print(f"{node.spec.label(method)}: {len(files)} input files, {size / 1e6:.0f} MB under {args.data}; "
          f"median of {args.repeats}\n")
    print("| inputs digest | seconds | vs content hash |\n| --- | ---: | ---: |")
    print(f"| content, digest table cold (reference: before, in each experiment's workspace) | {before:.3f} | 1.00× |")
    print(f"| file stamps (now) | {after:.5f} | {before / after:.0f}× |")
    print(f"\nhashing rate {rate / 1e9:.2f} GB/s; estimate for a {PAPER_FEATURES_BYTES / 1e9:.0f} GB feature "
          f"cache: {PAPER_FEATURES_BYTES / rate / 60:.0f} min of hashing per queued experiment before, none now "
          "(estimate from the rate)")


if __name__ == "__main__":
    main()
