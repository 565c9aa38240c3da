"""Shared `main()` plumbing: params path argument, logging, one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from pipeline.cache import CacheError
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import DatasetError

# Bad input the user can fix: reported as one line, never a traceback.
USER_ERRORS = (ConfigError, DatasetError, CacheError, FileNotFoundError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def main_guard(body: Callable[[argparse.Namespace, Config], object], args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        body(args, load_config(args.params))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
