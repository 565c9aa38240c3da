"""Where each stage writes, under one data root (default `data/`; tests use a temp folder)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

DATA = Path("data")
LM_CACHE = DATA / "lm_cache"  # GGUF models converted once to transformers folders (not DVC-tracked)


def package_dir(module: str) -> Path:
    """Folder of an installed package (packaged data or weights), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {module!r} is not installed (run `make setup`)")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class Dirs:
    """The stage folders under a data root. Stages declare their outputs relative to `root`."""

    root: Path = DATA

    @classmethod
    def under(cls, root: str | Path) -> "Dirs":
        return cls(Path(root))

    def sharing_inputs(self, root: str | Path, names: tuple[str, ...] = ("prepared", "features", "prototypes")
                       ) -> "Dirs":
        """A new data root whose `names` folders are links to this root's (never copied or re-made)
        and whose outputs are its own: seeds of a study, benches, tests."""
        new = Dirs.under(root)
        new.root.mkdir(parents=True, exist_ok=True)
        for name in names:
            link = getattr(new, name)
            if not link.is_symlink():
                link.symlink_to(getattr(self, name).resolve(), target_is_directory=True)
        return new

    @property
    def prepared(self) -> Path:  # {split}.parquet, {split}_questions.parquet, report.json
        return self.root / "prepared"

    @property
    def features(self) -> Path:  # <key>.h5, index.json (split -> file), report.json (counts, skipped images)
        return self.root / "features"

    @property
    def prototypes(self) -> Path:  # <key>.h5, index.json
        return self.root / "prototypes"

    @property
    def models(self) -> Path:  # <method>/model.safetensors, config.json (the bridge); checkpoints/ (resume state, not an output)
        return self.root / "models"

    @property
    def metrics(self) -> Path:  # <task>/<method>.json, train/<method>/ (dvclive), summary.{md,json}: git-tracked
        return self.root / "metrics"

    @property
    def plots(self) -> Path:  # plot data (recall curves, generated captions, answers), summary.png: git-tracked
        return self.root / "plots"

    @property
    def pages(self) -> Path:  # HTML example pages with embedded images: DVC-cached, not in git
        return self.root / "pages"

    @property
    def reports(self) -> Path:  # timings and machine facts: in no hashed output, not in git
        return self.root / "reports"
