"""Run every stage of the graph in-process on a small easy-VQA cut (tests of the whole graph)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.manifest import Split, read_manifest, read_questions, write_split
from pipeline.config import Config
from pipeline.paths import Dirs
from stages import graph
from stages.common import run_stage


class RecordingConfig:
    """A view of a Config that records every leaf field read, as "section.field" keys."""

    def __init__(self, obj, prefix: str, log: set):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        if name.startswith("__"):
            return value
        key = self._prefix + name
        if dataclasses.is_dataclass(value):
            return RecordingConfig(value, key + ".", self._log)
        self._log.add(key)
        return value


def snapshot(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def run_graph(cfg: Config, dirs: Dirs, record: bool, sizes: tuple[int, int] = (48, 24),
              methods: tuple[str, ...] | None = None) -> dict[str, tuple[set, set]]:
    """Every stage in graph order, in-process; easy-VQA cut to `sizes` train / test images after prepare.
    `methods`: only these methods' stages, and no summary (which compares every method).
    Returns label -> (params read, files written) when recording."""
    seen = {}
    for node in graph.graph():
        if methods is not None and node.spec.name == "summarize":
            continue
        for method in node.instances():
            if methods is not None and method is not None and method not in methods:
                continue
            log: set[str] = set()
            before = snapshot(dirs.root) if dirs.root.exists() else {}
            run_stage(node.module, RecordingConfig(cfg, "", log) if record else cfg, dirs, method)
            if node.spec.name == "prepare":
                cut_easyvqa(dirs, sizes)
            after = snapshot(dirs.root)
            seen[node.spec.label(method)] = (log, {p for p, t in after.items() if before.get(p) != t})
    return seen


def cut_easyvqa(dirs: Dirs, sizes: tuple[int, int]) -> None:
    for split, n in zip(("train", "test"), sizes):
        manifest = read_manifest(dirs.prepared, split)
        keep = {r.image_id for r in manifest.images[:n]}
        questions = [q for q in read_questions(dirs.prepared, split) if q["image_id"] in keep]
        write_split(dirs.prepared, Split(split, manifest.image_root, manifest.images[:n], questions))


