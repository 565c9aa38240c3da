"""Shared `main()` plumbing: params path argument, logging, one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from pipeline.cache import CacheError
from pipeline.config import METHODS, Config, ConfigError, load_config
from pipeline.data import DatasetError
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.runtime import keep_freed_memory

# Bad input the user can fix: reported as one line, never a traceback.
USER_ERRORS = (ConfigError, DatasetError, CacheError, FileNotFoundError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--data", default="data", type=Path, help="root of the stage folders (default: data)")
    return p


def main_guard(body: Callable[[argparse.Namespace, Config], object], args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        body(args, load_config(args.params))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def method_parser(description: str) -> argparse.ArgumentParser:
    p = parser(description)
    p.add_argument("--method", required=True, choices=METHODS)
    return p


def method_stage_main(run: Callable, description: str, argv: list[str] | None) -> int:
    """main() of a per-method stage: `run(cfg, method, dirs)` with --method, --params, --data."""
    args = method_parser(description).parse_args(argv)
    return main_guard(lambda a, cfg: run(cfg, a.method, Dirs.under(a.data)), args)


def write_metrics(metrics_dir: Path, task: str, method: str, metrics: dict) -> Path:
    """data/metrics/<task>/<method>.json (a DVC metrics file), written atomically."""
    path = Path(metrics_dir) / task / f"{method}.json"
    write_json_atomic(path, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    logging.getLogger(f"stages.evaluate_{task}").info("%s %s: %s", task, method, metrics)
    return path
