"""The Prefect flow: dvc.yaml's stages as Prefect tasks, cached on content keys.

    python -m pipeline.flow [--params params.yaml] [--data data] [--dask]
    python -m pipeline.flow --deploy     # serve the deployment "vlap-default" (blocks until stopped)

Runs prepare -> extract, prototypes -> train per method -> evaluate_<task> per method -> summarize,
calling the same `stages.<name>.run` functions that dvc.yaml's commands call. This is the only
module that imports Prefect. Under `dvc repro` DVC decides what is stale; under this flow the
cache keys do.

A stage's key hashes what determines its outputs (the same deps and params dvc.yaml lists): its
params sections, the content of its input files and the source of its code. Prefect's defaults
would not do: the default policy includes the flow run id (nothing is reused across runs) and the
INPUTS policy hashes a Path by its string, not by the file's contents. Results are small (reports,
paths, metric dicts) and persist under <data>/.prefect-results, which is what a later run reuses.
A task whose own output files are missing re-runs even on a key hit; after `dvc checkout` or
`dvc repro` rewrote data/ behind the flow's back, PREFECT_TASKS_REFRESH_CACHE=true re-runs all.

Reads  params.yaml (or --params) and what each stage reads under --data.
Writes what each stage writes under --data, plus <data>/.prefect-results/<key> (one per task run).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

from prefect import Task, flow, task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pipeline.config import METHODS, Config, ConfigError, PrepareConfig, load_config
from pipeline.data import package_dir
from pipeline.encoders import resolve_hf_folder, weights_hash
from pipeline.io import sha256_file, sha256_json
from pipeline.paths import Dirs
from pipeline.runtime import keep_freed_memory
from pipeline.tasks.summary import HEADLINES
from stages import (evaluate_arithmetic, evaluate_caption, evaluate_retrieval, evaluate_vqa, extract, prepare,
                    prototypes, summarize, train)
from stages.common import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]  # holds pipeline/ and stages/ (the repo, or site-packages)
EVAL_TASKS = tuple(HEADLINES)  # caption, vqa, retrieval, arithmetic: the tasks summarize reads
# One task at a time in threads: each stage already uses every core for its tensor maths, so
# threads would only contend. Tasks run side by side under DaskTaskRunner (--dask), where each
# task is in its own worker process (on its own machine, in a cluster).
MAX_WORKERS = 1

# Code deps of each stage, as dvc.yaml lists them (tests/test_flow.py checks that the two agree).
CODE = {
    "prepare": ["stages/prepare.py", "pipeline/data.py"],
    "extract": ["stages/extract.py", "pipeline/encoders.py", "pipeline/cache.py"],
    "prototypes": ["stages/prototypes.py", "pipeline/prototypes.py", "pipeline/lms.py"],
    "train": ["stages/train.py", "pipeline/train.py", "pipeline/losses.py", "pipeline/ot.py", "pipeline/bridge.py"],
    **{f"evaluate_{t}": [f"stages/evaluate_{t}.py", "pipeline/tasks", "pipeline/generation.py"] for t in EVAL_TASKS},
    "summarize": ["stages/summarize.py", "pipeline/tasks/summary.py"],
}


# ---------------------------------------------------------------- content hashes
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or "missing" (the stage itself then reports the missing file)."""
    return sha256_file(path) if Path(path).is_file() else "missing"


def tree_digest(path: Path, pattern: str = "*") -> str:
    """sha256 over (relative name, content hash) of every file under `path` matching `pattern`."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob(pattern))
                        if p.is_file() and "__pycache__" not in p.parts})


def code_version(stage: str) -> str:
    return sha256_json({name: tree_digest(ROOT / name, "*.py") for name in CODE[stage]})


def manifests_digest(prepared_dir: Path, questions: bool = False) -> dict[str, str]:
    """Content hashes of the Parquet manifests (and, with `questions`, the questions tables)."""
    return {p.name: sha256_file(p) for p in sorted(Path(prepared_dir).glob("*.parquet"))
            if questions or not p.stem.endswith("_questions")}


def weights_digest(spec: str, role: str) -> str:
    """A model's weights: hashed for an `hf:` folder; packaged weights are pinned by their spec."""
    return weights_hash(resolve_hf_folder(spec, role)) if spec.startswith("hf:") else spec


def source_root(cfg: PrepareConfig) -> Path:
    return package_dir("easy_vqa") / "data" if cfg.source == "easyvqa" else Path(cfg.folder)


def pick(section: Any, *keys: str) -> dict:
    return {k: getattr(section, k) for k in keys}


def content_key(stage: str, params: dict, inputs: dict) -> str:
    return sha256_json({"stage": stage, "params": params, "inputs": inputs, "code": code_version(stage)})


# ---------------------------------------------------------------- cache keys: (task run context, call parameters)
def prepare_key(_, p: dict) -> str:
    cfg: Config = p["cfg"]
    inputs = {"source": tree_digest(source_root(cfg.prepare))}
    if cfg.prepare.annotations:  # karpathy: the split file may live outside the image root
        inputs["annotations"] = file_digest(Path(cfg.prepare.annotations))
    return content_key("prepare", {"prepare": asdict(cfg.prepare)}, inputs)


def extract_key(_, p: dict) -> str:
    cfg: Config = p["cfg"]
    return content_key("extract", {"extract": pick(cfg.extract, "encoder", "dtype")},
                       {"manifests": manifests_digest(p["prepared_dir"]),
                        "encoder": weights_digest(cfg.extract.encoder, "encoder")})


def prototypes_key(_, p: dict) -> str:
    cfg: Config = p["cfg"]
    return content_key("prototypes", {"prototypes": pick(cfg.prototypes, "llm", "subset", "prior", "temperature",
                                                           "smoothing")},
                       {"manifests": manifests_digest(p["prepared_dir"]),
                        "llm": weights_digest(cfg.prototypes.llm, "llm")})


def train_key(_, p: dict) -> str:
    cfg, method = p["cfg"], p["method"]
    return content_key("train", {"train": asdict(cfg.train), "llm": cfg.prototypes.llm,
                                 "method": asdict(getattr(cfg.methods, method))},
                       {"method": method, "manifest": file_digest(Path(p["prepared_dir"]) / "train.parquet"),
                        # index files name the content-keyed feature / prototype files
                        "features": file_digest(Path(p["features_dir"]) / "index.json"),
                        "prototypes": file_digest(Path(p["prototypes_dir"]) / "index.json")})


def evaluate_key(eval_task: str, _, p: dict) -> str:
    cfg, method, dirs = p["cfg"], p["method"], p["dirs"]
    params = {"common": asdict(cfg.evaluate.common), eval_task: asdict(getattr(cfg.evaluate, eval_task))}
    return content_key(f"evaluate_{eval_task}", params,
                       {"method": method, "bridge": file_digest(dirs.models / method / "bridge.pt"),
                        "manifests": manifests_digest(dirs.prepared, questions=True),
                        "features": file_digest(dirs.features / "index.json"),
                        "prototypes": file_digest(dirs.prototypes / "index.json")})


def summarize_key(_, p: dict) -> str:
    dirs: Dirs = p["dirs"]
    return content_key("summarize", {}, {f"{t}/{m}": file_digest(dirs.metrics / t / f"{m}.json")
                                         for t in EVAL_TASKS for m in METHODS})


# ---------------------------------------------------------------- outputs: missing ones force a re-run
def indexed_outputs(index: Path, files: Callable[[dict], list[str]]) -> list[Path]:
    """An index file and the files it names (files(index content) -> names beside it)."""
    return [index] + ([index.parent / f for f in files(json.loads(index.read_text()))] if index.exists() else [])


def outputs(stage: str, dirs: Dirs, method: str | None = None) -> list[Path]:
    if stage == "prepare":
        return indexed_outputs(dirs.prepared / "report.json", lambda report: [f"{s}.parquet" for s in report])
    if stage == "extract":
        return indexed_outputs(dirs.features / "index.json", lambda index: [e["file"] for e in index.values()])
    if stage == "prototypes":
        return indexed_outputs(dirs.prototypes / "index.json", lambda index: [index["file"]])
    if stage == "train":
        return [dirs.models / method / "bridge.pt", dirs.models / method / "bridge.json"]
    if stage.startswith("evaluate_"):
        return [dirs.metrics / stage.removeprefix("evaluate_") / f"{method}.json"]
    if stage == "summarize":
        return [dirs.metrics / "summary.md", dirs.metrics / "summary.json", dirs.plots / "summary.png"]
    raise ValueError(f"flow: unknown stage {stage!r} (expected one of {', '.join(CODE)})")


# ---------------------------------------------------------------- tasks and the flow
def stage_task(name: str, fn: Callable, key: Callable) -> Task:
    """A plain stage function as a task, cached on its content key; results persist, not kept in memory."""
    return task(fn, name=name, cache_key_fn=key, persist_result=True, cache_result_in_memory=False)


TASKS: dict[str, Task] = {
    "prepare": stage_task("prepare", prepare.run, prepare_key),
    "extract": stage_task("extract", extract.run, extract_key),
    "prototypes": stage_task("prototypes", prototypes.run, prototypes_key),
    "train": stage_task("train", train.run, train_key),
    **{f"evaluate_{t}": stage_task(f"evaluate_{t}", module.run, partial(evaluate_key, t))
       for t, module in zip(EVAL_TASKS, (evaluate_caption, evaluate_vqa, evaluate_retrieval, evaluate_arithmetic))},
    "summarize": stage_task("summarize", summarize.run, summarize_key),
}


def configured(name: str, dirs: Dirs, results: Path, method: str | None = None) -> Task:
    """TASKS[name] for one run: results stored under `results`; forced to re-run when its outputs are gone
    (None leaves the decision to the key and to PREFECT_TASKS_REFRESH_CACHE)."""
    missing = not all(p.exists() for p in outputs(name, dirs, method))
    return TASKS[name].with_options(task_run_name=f"{name}-{method}" if method else name, result_storage=results,
                                    refresh_cache=True if missing else None)


@flow(name="vlap-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def vlap_pipeline(params: str = "params.yaml", data: str = "data") -> dict:
    """The whole pipeline; returns {"metrics": {"<task>/<method>": metrics dict}, "summary": summary.md path}."""
    cfg, root = load_config(params), Path(data).resolve()
    dirs, results = Dirs.under(root), root / ".prefect-results"

    def t(name: str, method: str | None = None) -> Task:
        return configured(name, dirs, results, method)

    t("prepare")(cfg, dirs.prepared)  # inline: every later key hashes its manifests
    features = t("extract").submit(cfg, dirs.prepared, dirs.features)
    protos = t("prototypes").submit(cfg, dirs.prepared, dirs.prototypes)
    # Submitted in DAG order: a FIFO pool then never holds a task whose upstream is still queued.
    trains = {m: t("train", m).submit(cfg, m, dirs.prepared, dirs.features, dirs.prototypes, dirs.models,
                                      wait_for=[features, protos]) for m in METHODS}
    evals = {f"{e}/{m}": t(f"evaluate_{e}", m).submit(cfg, m, dirs, wait_for=[trains[m]])
             for m in METHODS for e in EVAL_TASKS}
    summary = t("summarize").submit(cfg, dirs, wait_for=list(evals.values()))
    # Results in DAG order: the first failure raised is the cause, not a downstream "NotReady".
    for future in (features, protos, *trains.values()):
        future.result()
    metrics = {k: f.result() for k, f in evals.items()}
    summary.result()
    return {"metrics": metrics, "summary": str(dirs.metrics / "summary.md")}


def dask_runner() -> TaskRunner:
    """prefect-dask's runner on a local Dask cluster; imported only when asked for."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("--dask needs the prefect-dask package (pip install prefect-dask)") from None
    return DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1})  # parallel processes, not threads (MAX_WORKERS)


def serve_deployment(params: str, data: str) -> None:
    """Register the deployment "vlap-default" and run its flow runs from this process (blocks)."""
    from prefect import serve

    serve(vlap_pipeline.to_deployment(name="vlap-default", parameters={"params": params, "data": data}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--data", default="data", help="root of the stage folders (default: data)")
    p.add_argument("--dask", action="store_true", help="run tasks on a Dask cluster (needs prefect-dask)")
    p.add_argument("--deploy", action="store_true", help="serve the deployment vlap-default instead (blocks)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # as the dvc stages do
    try:
        load_config(args.params)  # a bad params file fails in one line, before Prefect starts
        if args.deploy:
            serve_deployment(args.params, args.data)
            return 0
        pipeline = vlap_pipeline.with_options(task_runner=dask_runner()) if args.dask else vlap_pipeline
        pipeline(params=args.params, data=args.data)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
