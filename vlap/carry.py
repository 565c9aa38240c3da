"""Finished study cells carried between machines in a folder that git (or any copy) moves: `vlap study --carry DIR`.

A study at a converged budget runs for many hours, longer than one machine may be held. Its cells' outputs live
under `<out>/runs/`, which git ignores. With `--carry DIR`, each cell that finishes copies its stage outputs (the
bridge, the training log, each evaluation's metrics and per-item files: a few MB) and its record entries
(stages.graph.RunRecord) into DIR, mirroring `<out>/runs/`. A study on another machine with the same DIR copies
them back first, into the seed roots that lack them. Nothing is trusted for being copied: the record keys on
content digests of each stage's params, data deps, code and outputs, so a carried cell is kept only where the
cached features, prototypes and code there are the same bytes; anything else trains again.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.io import atomic_path
from pipeline.paths import Dirs
from stages.graph import RUN_RECORD, Node, RunRecord

log = logging.getLogger("vlap.carry")


class CellCarry:
    """`folder` holds finished cells of the study whose runs are under `runs` (`<out>/runs`), at the same
    relative paths, with a `stages.lock.json` per data root holding only the carried entries."""

    def __init__(self, folder: Path, runs: Path):
        self.folder, self.runs = Path(folder), Path(runs)

    def restore(self) -> int:
        """Copy every carried stage run into its data root under `runs` where that root has no record of the
        stage; returns how many stage runs were restored."""
        restored = 0
        for carried_record in sorted(self.folder.rglob(RUN_RECORD)):
            rel = carried_record.parent.relative_to(self.folder)
            root = self.runs / rel
            record = RunRecord(root / RUN_RECORD)
            local = record.entries()
            entries = {label: e for label, e in RunRecord(carried_record).entries().items() if label not in local}
            if not entries:
                continue
            for entry in entries.values():
                for out in entry["outputs"]:
                    _copy(carried_record.parent / out, root / out)
            record.merge(entries)
            restored += len(entries)
            log.info("carry: %d stage run(s) of %s restored from %s", len(entries), rel, self.folder)
        return restored

    def save(self, dirs: Dirs, nodes: list[Node], method: str) -> None:
        """Copy a finished cell (the runs of `nodes` for `method` in the data root `dirs`) into the folder."""
        rel = Path(dirs.root).resolve().relative_to(self.runs.resolve())
        record = RunRecord(dirs.root / RUN_RECORD).entries()
        labels = [n.spec.label(method) for n in nodes if n.spec.label(method) in record]
        target = self.folder / rel
        for label in labels:
            for out in record[label]["outputs"]:
                _copy(dirs.root / out, target / out)
        RunRecord(target / RUN_RECORD).merge({k: record[k] for k in labels})
        log.info("carry: %s %s copied to %s", rel, method, self.folder)


def _copy(src: Path, dst: Path) -> None:
    """A file (atomically) or a folder's files, replacing what `dst` held."""
    if src.is_dir():
        if dst.is_dir():
            shutil.rmtree(dst)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            _copy(f, dst / f.relative_to(src))
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
