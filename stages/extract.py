"""Extract stage: every image of every split -> frozen vision tokens in the HDF5 cache.

Reads  data/prepared/{split}.parquet and params `extract.*`.
Writes data/features/<key>.h5 (one per split), index.json (split -> file) and
report.json (counts, skipped images with reasons, images/s).

    python -m stages.extract
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import data, paths
from pipeline.cache import extract_split
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.encoders import load_encoder
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from stages.common import main_guard, parser

log = logging.getLogger("stages.extract")


def run(cfg: Config, prepared_dir: Path = paths.PREPARED, out_dir: Path = paths.FEATURES) -> dict:
    """Encode all splits; return the report {split: {...}}."""
    splits = data.manifest_splits(prepared_dir)
    if not splits:
        raise data.DatasetError(f"{prepared_dir}: no manifests found (run the prepare stage first)")
    encoder = load_encoder(cfg.extract.encoder, resolve_device(cfg.extract.device))
    index, report = {}, {}
    for split in splits:
        manifest = data.read_manifest(prepared_dir, split)
        root = data.resolve_image_root(manifest.image_root, cfg.prepare)
        result = extract_split(manifest, root, encoder, out_dir, cfg.extract.dtype, cfg.extract.batch_size)
        index[split] = {"file": result.path.name, "key": result.key}
        report[split] = {
            "images": result.n_images,
            "encoded_now": result.n_encoded,
            "cache_hit": result.hit,
            "skipped": len(result.failed),
            "skipped_images": result.failed,
            "seconds": round(result.seconds, 2),
            "images_per_s": round(result.n_encoded / result.seconds, 1) if result.seconds else None,
        }
        for item in result.failed:
            log.warning("extract %s: skipped %s (%s)", split, item["image_id"], item["reason"])
    write_json_atomic(Path(out_dir) / "index.json", index)
    write_json_atomic(Path(out_dir) / "report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    return main_guard(lambda a, cfg: run(cfg, Dirs.under(a.data).prepared, Dirs.under(a.data).features), args)


if __name__ == "__main__":
    sys.exit(main())
