"""Train stage: fit the linear bridge for one method (vlap | limber | contrastive) on cached features.

Reads  data/features (train split), data/prototypes, data/prepared/train.parquet,
       params `train.*`, `methods.<method>.*` (and the LLM named by `prototypes.llm`).
Writes data/models/<method>/bridge.pt + bridge.json, dvclive curves in data/models/<method>/live;
       an interrupted run resumes from data/models/checkpoints/<method>.pt.

    python -m stages.train --method vlap
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import data, paths
from pipeline.cache import CacheError, FeatureCache, features_file
from pipeline.config import METHODS, Config
from pipeline.device import resolve_device
from pipeline.lms import LanguageModel, load_lm
from pipeline.prototypes import check_prototypes_match, load_prototypes, prototypes_file
from pipeline.train import TrainData, train_bridge
from pipeline.paths import Dirs
from stages.common import main_guard, parser

log = logging.getLogger("stages.train")


def load_train_data(cfg: Config, prepared_dir: Path, features_dir: Path) -> TrainData:
    """(image, caption) pairs of the training split that have cached features."""
    manifest = data.read_manifest(prepared_dir, "train")
    with FeatureCache(features_file(features_dir, "train")) as cache:
        pairs = [(r["image_id"], c) for r in manifest.images if r["image_id"] in cache.index for c in r["captions"]]
        if not pairs:
            raise CacheError(f"{cache.path}: no training image has both features and a caption")
        if cfg.train.max_samples and len(pairs) > cfg.train.max_samples:
            keep = np.random.default_rng(cfg.train.seed).permutation(len(pairs))[: cfg.train.max_samples]
            pairs = [pairs[i] for i in sorted(keep)]
        ids = [i for i, _ in pairs]
        tokens = torch.from_numpy(cache.tokens(ids))  # (n, N, d_v), one row per (image, caption) pair
        attrs = cache.attrs
    return TrainData(tokens=tokens, captions=[c for _, c in pairs], image_ids=ids,
                     features_key=str(attrs["cache_key"]),
                     encoder_weights_sha256=str(attrs["encoder_weights_sha256"]))


def run(cfg: Config, method: str, prepared_dir: Path = paths.PREPARED, features_dir: Path = paths.FEATURES,
        prototypes_dir: Path = paths.PROTOTYPES, models_dir: Path = paths.MODELS, lm: LanguageModel | None = None,
        stop_after: int | None = None) -> dict:
    if method not in METHODS:
        raise CacheError(f"train --method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    train_data = load_train_data(cfg, prepared_dir, features_dir)
    device = resolve_device(cfg.train.device)
    lm = lm or load_lm(cfg.prototypes.llm, device)
    protos = load_prototypes(prototypes_file(prototypes_dir), lm.device)
    check_prototypes_match(protos, lm)
    log.info("train %s: %d samples, %d steps of %d", method, len(train_data.captions), cfg.train.steps,
             cfg.train.batch_size)
    out_dir = Path(models_dir) / method
    checkpoint = Path(models_dir) / "checkpoints" / f"{method}.pt"  # not a DVC out: survives a re-run
    return train_bridge(method, cfg, train_data, lm, protos, out_dir, checkpoint, stop_after=stop_after)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=METHODS)
    args = p.parse_args(argv)
    dirs = Dirs.under(args.data)
    return main_guard(lambda a, cfg: run(cfg, a.method, dirs.prepared, dirs.features, dirs.prototypes, dirs.models), args)


if __name__ == "__main__":
    sys.exit(main())
