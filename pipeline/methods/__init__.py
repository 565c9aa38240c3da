"""The methods: VLAP and its baselines, one module each, and this list of them.

A method is a module pipeline/methods/<name>.py holding its params section (`methods.<name>`, a
`MethodConfig`) and its `Method`, an nn.Module that owns its parameters and returns its named loss
terms; the module's `METHOD` names the class. Registering it is its name in NAMES. Each method's
train stage depends on its own module only (stages/graph.py), so adding a method re-runs nothing
that exists. Worked example: docs/extending.md.
"""
from __future__ import annotations

import importlib

NAMES = ("vlap", "limber", "contrastive")  # each: pipeline/methods/<name>.py
PROPOSED = "vlap"  # the method every other is compared with
BASELINES = tuple(name for name in NAMES if name != PROPOSED)


def method_class(name: str) -> type:
    """The `Method` class (pipeline/methods/base.py) of a registered method; its module is imported here, on
    first use (so that only a method's own train stage depends on its module)."""
    if name not in NAMES:
        raise KeyError(f"unknown method {name!r} (expected one of {', '.join(NAMES)})")
    return importlib.import_module(f"{__name__}.{name}").METHOD


def method_sections() -> dict[str, type]:
    """name -> the params section class of each registered method (what `methods:` in params.yaml holds)."""
    return {name: method_class(name).Config for name in NAMES}
