"""The cached inputs every multi-run command (tune, study, curves) starts from, checked once before any run."""
from __future__ import annotations

from pipeline.errors import MissingInputError
from pipeline.paths import Dirs


def require_cached_inputs(base: Dirs) -> None:
    """One line naming the data root when its features or prototypes were never made: these commands reuse
    the pipeline's and never extract or build them themselves."""
    if not (base.features / "index.json").exists() or not base.prototypes.exists():
        raise MissingInputError(f"{base.root}: no cached features or prototypes "
                                "(run `dvc repro extract prototypes` first)")
