"""Data sources: one module per source, and this list of them.

A source module pipeline/sources/<name>.py has `load(cfg: PrepareConfig, role: Role) -> (splits, report)`;
registering it is one line in SOURCES (the params schema's `prepare.source` takes its names from here).
Only the prepare stage reads a source (pipeline/sources/prepare.py): every later stage reads the
manifests (pipeline.manifest). Sources and their files: docs/datasets.md.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Source:
    name: str  # also its module's name
    test_source: bool = False  # can be `prepare.test_source`: its files give a test split of their own


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("easyvqa"),
    Source("folder", test_source=True),
    Source("karpathy", test_source=True),
    Source("webdataset"),
    Source("cc3m"),
    Source("nocaps", test_source=True),
    Source("vqav2", test_source=True),
)}


def loader(name: str) -> Callable:
    """The `load` function of a registered source (its module is imported here, on first use)."""
    return importlib.import_module(f"{__name__}.{name}").load
