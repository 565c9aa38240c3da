"""Prototypes stage: frozen LLM -> normalised word embeddings, word prior mu, caption reps z_t.

Reads  data/prepared/{split}.parquet (captions) and params `prototypes.*`.
Writes data/prototypes/<key>.h5 and data/prototypes/index.json (-> that file).

    python -m stages.prototypes
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline import data, paths
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.io import write_json_atomic
from pipeline.lms import load_lm
from pipeline.prototypes import build_prototypes
from pipeline.paths import Dirs
from stages.common import main_guard, parser


def run(cfg: Config, prepared_dir: Path = paths.PREPARED, out_dir: Path = paths.PROTOTYPES, lm=None) -> Path:
    """Build (or reuse) the prototypes file; `lm` may be passed in to reuse a loaded model."""
    manifests = [data.read_manifest(prepared_dir, split) for split in data.manifest_splits(prepared_dir)]
    train = [m for m in manifests if m.split == "train"]
    if not train:
        raise data.DatasetError(f"{prepared_dir}: no train manifest (run the prepare stage first)")
    train_captions = [c for row in train[0].images for c in row["captions"]]
    all_texts = [c for m in manifests for row in m.images for c in row["captions"]]
    lm = lm or load_lm(cfg.prototypes.llm, resolve_device(cfg.prototypes.device))
    path, _ = build_prototypes(lm, train_captions, all_texts, cfg.prototypes, out_dir)
    write_json_atomic(Path(out_dir) / "index.json", {"file": path.name, "key": path.stem})
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    return main_guard(lambda a, cfg: run(cfg, Dirs.under(a.data).prepared, Dirs.under(a.data).prototypes), args)


if __name__ == "__main__":
    sys.exit(main())
