"""Prototypes stage: frozen LLM -> normalised word embeddings, word prior mu, caption reps z_t.

Reads  data/prepared/{split}.parquet (captions) and params `prototypes.*`, `train.prompt`.
Writes data/prototypes/<key>.h5 and data/prototypes/index.json (-> that file).

    python -m stages.prototypes
"""
from __future__ import annotations

import sys

from pipeline.manifest import manifest_splits, read_manifest
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.errors import MissingInputError
from pipeline.io import write_json_atomic
from pipeline.lms import load_lm
from pipeline.paths import Dirs
from pipeline.prototypes import build_prototypes
from stages.common import Out, StageSpec, stage_main

STAGE = StageSpec(
    name="prototypes", description=__doc__.splitlines()[0],
    params=("prototypes", "train.prompt"),  # the prompt: the prior counts caption tokens as they follow it
    deps=("prepared",),
    outs=(Out("prototypes", persist=True),),  # persist: the files of other LLMs / prior settings stay
)


def run(cfg: Config, dirs: Dirs, method: None = None, *, lm=None) -> dict:
    """Build (or reuse) the prototypes file; `lm` may be passed in to reuse a loaded model."""
    manifests = [read_manifest(dirs.prepared, split) for split in manifest_splits(dirs.prepared)]
    train = [m for m in manifests if m.split == "train"]
    if not train:
        raise MissingInputError(f"{dirs.prepared}: no train manifest (run the prepare stage first)")
    train_captions = [c for row in train[0].images for c in row.captions]
    all_texts = [c for m in manifests for row in m.images for c in row.captions]
    lm = lm or load_lm(cfg.prototypes.llm, resolve_device(cfg.prototypes.device))
    path, hit = build_prototypes(lm, train_captions, all_texts, cfg.prototypes, dirs.prototypes, cfg.train.prompt)
    index = {"file": path.name, "key": path.stem}
    write_json_atomic(dirs.prototypes / "index.json", index)
    return index | {"cache_hit": hit}


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
