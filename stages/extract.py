"""Extract stage: every image of every split -> frozen vision tokens in the HDF5 cache.

Reads  data/prepared/{split}.parquet and params `extract.*`. Shards of `extract.shard_size` images are
       encoded inline, on a local Dask cluster (`extract.workers`) or an existing one (`extract.scheduler`).
Writes data/features/<key>.h5 (one per split), index.json (split -> file) and report.json
(counts, skipped images with reasons); timings go to data/reports/extract.json (in no output).

    python -m stages.extract
"""
from __future__ import annotations

import contextlib
import logging
import sys

from pipeline.manifest import manifest_splits, read_manifest, resolve_image_root
from pipeline.extraction import ShardCluster, extract_split, tls_security
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.encoders import load_encoder
from pipeline.errors import MissingInputError
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from stages.common import Out, StageSpec, stage_main

STAGE = StageSpec(
    name="extract", description=__doc__.splitlines()[0],
    params=("extract", "prepare.folder", "prepare.test_folder"),
    deps=("prepared",),
    # persist: keyed files of other encoders stay (switching back is a cache hit),
    # and an interrupted run keeps its finished blocks to resume from.
    outs=(Out("features", persist=True),),
)
log = logging.getLogger("stages.extract")


def run(cfg: Config, dirs: Dirs, method: None = None, *, lm=None) -> dict:
    """Encode all splits; return the report {split: {...}}."""
    splits = manifest_splits(dirs.prepared)
    if not splits:
        raise MissingInputError(f"{dirs.prepared}: no manifests found (run the prepare stage first)")
    xcfg = cfg.extract
    encoder = load_encoder(xcfg.encoder, resolve_device(xcfg.device))
    index, report, timings = {}, {}, {}
    with contextlib.ExitStack() as stack:
        security = tls_security(xcfg.scheduler, xcfg.tls_ca_file, xcfg.tls_cert, xcfg.tls_key)  # checked inline too
        cluster = (stack.enter_context(ShardCluster(xcfg.workers, xcfg.scheduler, security, device=xcfg.device))
                   if xcfg.workers or xcfg.scheduler else None)
        results = {}
        for split in splits:
            manifest = read_manifest(dirs.prepared, split)
            root = resolve_image_root(manifest.image_root, cfg.prepare)
            results[split] = extract_split(manifest, root, encoder, dirs.features, xcfg.dtype, xcfg.batch_size,
                                           block_size=xcfg.shard_size, cluster=cluster,
                                           decode_workers=xcfg.decode_workers)
    for split, result in results.items():
        index[split] = {"file": result.path.name, "key": result.key}
        report[split] = {"images": result.n_images, "skipped": len(result.failed), "skipped_images": result.failed}
        timings[split] = {
            "encoded_now": result.n_encoded,
            "cache_hit": result.hit,
            "seconds": round(result.seconds, 2),
            "images_per_s": round(result.n_encoded / result.seconds, 1) if result.seconds else None,
        }
        for item in result.failed:
            log.warning("extract %s: skipped %s (%s)", split, item["image_id"], item["reason"])
    write_json_atomic(dirs.features / "index.json", index)
    write_json_atomic(dirs.features / "report.json", report)
    write_json_atomic(dirs.reports / "extract.json", timings)  # machine-dependent: outside every hashed output
    return {split: report[split] | timings[split] for split in splits}


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
