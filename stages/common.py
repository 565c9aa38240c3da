"""The stage contract, shared by every stage module.

A stage module has
  STAGE = StageSpec(...)                          what it reads (params, data) and writes
  run(cfg, dirs, method=None, *, lm=None) -> dict  the work (a per-method stage needs `method`)
  main(argv) -> int                                `python -m stages.<name>`, what dvc.yaml calls
and nothing else is needed to put it in the graph: `stages.graph` lists the modules in order,
writes dvc.yaml from their STAGE specs and derives their code deps from their imports; the
Prefect flow runs the same `run` through `run_stage`, which holds the locks of the outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal

from filelock import FileLock

from pipeline.config import METHODS, Config, load_config, plain
from pipeline.digests import tree_stamp
from pipeline.errors import ConfigError, report_user_errors
from pipeline.io import sha256_json, write_json_atomic, write_text_atomic
from pipeline.locks import LOCK_DIR, locked
from pipeline.paths import Dirs
from pipeline.runtime import keep_freed_memory


@dataclass(frozen=True)
class Out:
    """One output, relative to the data root; "{method}" stands for the stage's method."""

    path: str
    kind: Literal["outs", "metrics", "plots"] = "outs"
    cache: bool = True  # False: a small file git tracks (metrics, plot data), as DVC expects for experiments
    persist: bool = False  # kept across runs (content-keyed caches of other settings, resume state)
    x: str | None = None  # plots: the x axis column
    items: bool = False  # an evaluation's per-item scores, which the study bootstraps over (pipeline.tasks.registry)


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads and writes. Paths are relative to the data root; "{method}" is expanded."""

    name: str
    params: tuple[str, ...]  # dotted params keys (a section name stands for all its fields)
    deps: tuple[str, ...]  # data it reads
    outs: tuple[Out, ...]
    per_method: bool = False  # one stage per method (dvc foreach over METHODS)
    files: tuple[str, ...] = ()  # repo-relative files it reads besides code (a committed study), deps like code
    always_changed: bool = False  # runs every time (it looks at data DVC cannot list: the source's files)
    description: str = ""

    def label(self, method: str | None) -> str:
        return f"{self.name}@{method}" if self.per_method else self.name

    def expand(self, text: str, method: str | None) -> str:
        return text.replace("{method}", method) if self.per_method else text

    def out_paths(self, dirs: Dirs, method: str | None) -> list[Path]:
        return [dirs.root / self.expand(o.path, method) for o in self.outs]

    def items_path(self, dirs: Dirs, method: str | None) -> Path:
        """Its per-item scores file: the one output marked `items`, where the stage writes and the study reads."""
        (out,) = [o for o in self.outs if o.items]
        return dirs.root / self.expand(out.path, method)

    def dep_paths(self, dirs: Dirs, method: str | None) -> list[Path]:
        return [dirs.root / self.expand(d, method) for d in self.deps]

    def param_keys(self, method: str | None) -> list[str]:
        return [self.expand(p, method) for p in self.params]


# What every evaluation of a trained bridge reads: its bridge, the manifests, the cached features and
# prototypes; the evaluate.common fields every evaluation uses, and the image root of example pages.
EVALUATION_DEPS = ("models/{method}/model.safetensors", "models/{method}/config.json", "prepared", "features", "prototypes")
EVALUATION_PARAMS = ("evaluate.common.test_images", "evaluate.common.batch_size", "evaluate.common.device",
                     "prepare.folder", "prepare.test_folder")
# Why captioning, retrieval and arithmetic skip a test split without reference captions.
NO_TEST_CAPTIONS = ("the test split has no reference captions (VQAv2 has none); this task needs a test source "
                    "with captions (e.g. prepare.test_source nocaps or karpathy)")


def check_method(spec: StageSpec, method: str | None) -> None:
    if spec.per_method and method not in METHODS:
        raise ConfigError(f"{spec.name} --method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    if not spec.per_method and method is not None:
        raise ConfigError(f"{spec.name}: takes no --method (got {method!r})")


# Set for the processes a stage run starts to do its work (the train stage's under torchrun) to that run's label:
# the run that started them holds the outputs' locks and records what they write, so they take neither.
LOCKS_HELD_BY = "VLAP_LOCKS_HELD_BY"


def run_stage(module: ModuleType, cfg: Config, dirs: Dirs, method: str | None = None, **kwargs) -> Any:
    """`module.run(cfg, dirs, method)` while holding the locks of the stage's outputs.

    Two runs on one data folder (the flow and `dvc repro`, two `dvc repro`s) meet here: the second waits
    for the first's locks, then finds in <data>/.locks/written.json what the first wrote, from which
    inputs, and runs only if its own inputs differ or the outputs have changed since (DVC clears a
    stage's outputs before it runs it: the stage then writes them again, the same bytes)."""
    spec: StageSpec = module.STAGE
    check_method(spec, method)
    label, outs = spec.label(method), spec.out_paths(dirs, method)
    # a torchrun process other than rank 0 writes nothing; a launched rank 0's parent holds the locks
    if os.environ.get("RANK", "0") != "0" or os.environ.get(LOCKS_HELD_BY) == label:
        return module.run(cfg, dirs, method, **kwargs)
    with locked(dirs.root, outs, holder=label) as waited:
        written = WrittenOutputs(dirs.root / LOCK_DIR / "written.json")
        inputs = whole_config_and_deps_digest(spec, method, cfg, dirs)
        if waited and written.holds(label, inputs, outs):
            logging.getLogger("stages").info("%s: the run waited for wrote these outputs from the same inputs; "
                                             "not run again", label)
            return {"written_by_the_run_waited_for": True}
        remove_leftover_temps(outs)
        started = time.time()
        result = module.run(cfg, dirs, method, **kwargs)
        written.record(label, inputs, outs)
        RunJournal(dirs.root / LOCK_DIR / RUN_JOURNAL).append(label, inputs, started)
        return result


def remove_leftover_temps(outs: list[Path]) -> None:
    """Temp files a killed run left in its outputs (pipeline.io.atomic_path names them `.<name>.*.tmp`):
    never renamed, so never an output, only disk. Removed while this run holds the outputs' locks, so no
    other run is writing them."""
    for out in outs:
        found = out.rglob(".*.tmp") if out.is_dir() else out.parent.glob(f".{out.name}.*.tmp")
        for tmp in list(found):
            tmp.unlink(missing_ok=True)


def whole_config_and_deps_digest(spec: "StageSpec", method: str | None, cfg: Config, dirs: Dirs) -> str:
    """Hash of the whole config and of the stage's data deps' file stamps (name, size, mtime): what two runs
    on one data folder, from one checkout, may differ in (so no code). Stamps, not content: the two runs
    see the same files, and reading them would cost every stage run a hash of its inputs wherever the
    digest table does not know their paths (each queued DVC experiment runs in a new temporary copy:
    bench/rehash.py). The whole config, not the declared params alone (as
    stages.graph.Node.declared_inputs_digest hashes): reading those here would count as the stage reading
    them (tests/graph_runner.py records every field read), and a run whose unrelated params differ only
    runs again."""
    return sha256_json({"params": plain(cfg) if dataclasses.is_dataclass(cfg) else repr(type(cfg)),
                        "deps": {str(p.relative_to(dirs.root)): tree_stamp(p) if p.exists() else None
                                 for p in spec.dep_paths(dirs, method)}})


class WrittenOutputs:
    """{label: {"inputs": whole_config_and_deps_digest, "files": {path: [size, mtime_ns]}}} of the last run
    of each stage under a data root, whoever ran it (dvc repro, the flow, the study): enough for a run that
    waited on the output locks to tell whether the outputs are still exactly what the run it waited for
    wrote, without reading them. DVC and Prefect decide to run a stage before it waits, and neither sees
    the other's runs, so neither can tell this."""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def files(outs: list[Path]) -> dict[str, list[int]]:
        found = {}
        for out in outs:
            for f in ([out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir()
                      else []):
                st = f.stat()
                found[str(f)] = [st.st_size, st.st_mtime_ns]
        return found

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def holds(self, label: str, inputs: str, outs: list[Path]) -> bool:
        entry = self._read().get(label)
        return bool(entry) and entry["inputs"] == inputs and entry["files"] == self.files(outs) != {}

    def record(self, label: str, inputs: str, outs: list[Path]) -> None:
        with FileLock(f"{self.path}.lock"):
            entries = self._read()
            entries[label] = {"inputs": inputs, "files": self.files(outs)}
            write_json_atomic(self.path, entries)


RUN_JOURNAL = "runs.jsonl"  # under <data>/.locks


class RunJournal:
    """One line per finished stage run under a data root, appended by whoever ran it (dvc repro's stage
    process, the flow, the study): {"stage", "inputs", "pid", "ppid", "started", "finished"}. Where
    WrittenOutputs keeps only the last run of each stage, this keeps every run: how many times a stage
    ran, and which process ran it, e.g. when two runs were started together. Append-only: a run killed
    mid-line leaves a torn last line, which `entries` skips."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, label: str, inputs: str, started: float) -> None:
        line = json.dumps({"stage": label, "inputs": inputs, "pid": os.getpid(), "ppid": os.getppid(),
                           "started": round(started, 3), "finished": round(time.time(), 3)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one write() of one short line to an O_APPEND file: lines of runs appending together never interleave
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def entries(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # a torn line
        return found


def stage_main(module: ModuleType, argv: list[str] | None, parents: tuple[argparse.ArgumentParser, ...] = (),
               body: Callable[[argparse.Namespace, Config, Dirs], Any] | None = None) -> int:
    """main() of every stage: --params, --data (and --method for a per-method stage); one-line errors.
    A stage with options of its own passes their `parents` parsers and the `body` that reads them."""
    spec: StageSpec = module.STAGE
    p = argparse.ArgumentParser(prog=f"python -m {module.__name__}", description=spec.description,
                                parents=list(parents))
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--data", default="data", type=Path, help="root of the stage folders (default: data)")
    if spec.per_method:
        p.add_argument("--method", required=True, choices=METHODS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    body = body or (lambda args, cfg, dirs: run_stage(module, cfg, dirs, getattr(args, "method", None)))
    return report_user_errors(lambda: body(args, load_config(args.params), Dirs.under(args.data)))


def write_metrics(dirs: Dirs, task: str, method: str, metrics: dict) -> dict:
    """data/metrics/<task>/<method>.json (a git-tracked DVC metrics file), written atomically."""
    metrics = {"applicable": True} | {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    write_json_atomic(dirs.metrics / task / f"{method}.json", metrics)
    logging.getLogger(f"stages.evaluate_{task}").info("%s %s: %s", task, method, metrics)
    return metrics


def write_not_applicable(spec: StageSpec, dirs: Dirs, method: str | None, reason: str) -> dict:
    """The data lacks this task's inputs: every declared output says so, and the run goes on."""
    logging.getLogger(f"stages.{spec.name}").warning("%s: not applicable: %s", spec.label(method), reason)
    record = {"applicable": False, "reason": reason}
    for path in spec.out_paths(dirs, method):
        if path.suffix == ".json":
            write_json_atomic(path, record)
        elif path.suffix == ".html":
            write_text_atomic(path, f"<!doctype html><meta charset=utf-8><p>Not applicable: {reason}</p>\n")
        else:
            raise ValueError(f"{spec.name}: no not-applicable form for {path}")  # programming error
    return record
