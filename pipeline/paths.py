"""Where each stage writes (relative to the repo root; dvc.yaml declares the same)."""
from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"  # {split}.parquet, {split}_questions.parquet, report.json
FEATURES = DATA / "features"  # <key>.h5, index.json (split -> file), report.json
PROTOTYPES = DATA / "prototypes"  # <key>.h5, index.json
MODELS = DATA / "models"  # <method>/bridge.pt, bridge.json, live/ (dvclive)
METRICS = DATA / "metrics"  # <task>/<method>.json, summary.md
PLOTS = DATA / "plots"  # example pages and figures
LM_CACHE = DATA / "lm_cache"  # GGUF models converted once to transformers folders (not DVC-tracked)


@dataclass(frozen=True)
class Dirs:
    """The stage folders, overridable as a whole (tests point them at a temp folder)."""

    prepared: Path = PREPARED
    features: Path = FEATURES
    prototypes: Path = PROTOTYPES
    models: Path = MODELS
    metrics: Path = METRICS
    plots: Path = PLOTS

    @classmethod
    def under(cls, root: Path) -> "Dirs":
        return cls(*(Path(root) / name for name in ("prepared", "features", "prototypes", "models", "metrics", "plots")))
