"""The Prefect flow: the stages of `stages.graph` as Prefect tasks, cached on DVC's own inputs.

    python -m vlap.flow [--params params.yaml] [--data data] [--dask]
    python -m vlap.flow --deploy     # serve the deployment "vlap-default" (blocks until stopped)

Walks the same graph dvc.yaml is written from and calls the same `run` of each stage module,
through `stages.common.run_stage` (which holds the outputs' locks, so a flow run and a
`dvc repro` never write one output together). Under `dvc repro` DVC decides what is stale;
here each task's cache key hashes what DVC hashes for that stage: the values of its declared
params, the content of its data deps and of its code deps (the files its imports reach). The
sources task, like its `always_changed` DVC stage, runs every time: it digests the source data
into sources.json, which prepare's key hashes like any data dep.
Prefect's own defaults would not do: the default policy includes the flow run id, and INPUTS
hashes a path by its string, not its content. Results (small dicts) persist as
JSON under <data>/.prefect-results; a task whose outputs are missing, or changed since its last flow run
(the RunRecord <data>/.prefect-results/stages.lock.json says), re-runs even on a key hit. On the repo's
own data/ and params.yaml, a stage that dvc.lock calls up to date (`dvc repro` made its outputs) is not
run again, a stage the flow runs is committed to dvc.lock (so a later `dvc repro` does not run it again),
and the flow holds the repo's run lock, as `vlap run` does (vlap/repro.py): the two never run at once
there. docs/up-to-date.md tells which record decides what.

Reads  params.yaml (or --params) and what each stage reads under --data.
Writes what each stage writes under --data, plus <data>/.prefect-results/<key> (one per inputs digest)
       and <data>/.prefect-results/stages.lock.json.
"""
from __future__ import annotations

import os

# An offline machine: the telemetry service would log an ERROR on every run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The stages' own log lines (counts, cache hits, skipped images) through Prefect's handlers.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "stages,pipeline")
# The temporary server Prefect starts when no PREFECT_API_URL is set: its default 20 s of start-up (counted
# in sleeps only) was too short on a loaded 2-core machine; a server that never answers is still one line.
SERVER_STARTUP_S = "180"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", SERVER_STARTUP_S)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from prefect import Task, flow, get_run_logger, task  # noqa: E402
from prefect.serializers import JSONSerializer  # noqa: E402
from prefect.context import get_run_context  # noqa: E402
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.errors import USER_ERRORS, ConfigError, LockTimeoutError, UserError, report_user_errors  # noqa: E402
from pipeline.locks import lock_timeout  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from stages.common import run_stage  # noqa: E402
from stages.graph import ROOT, RUN_RECORD, Node, RunRecord, graph  # noqa: E402
from vlap.repro import repo_run_lock  # noqa: E402

# One task at a time in threads by default: each stage already uses every core for its tensor maths
# (--workers N runs up to N side by side, e.g. one per GPU's worth of evaluations). Under DaskTaskRunner
# (--dask) tasks run side by side, each in its own worker process.
MAX_WORKERS = 1
# A failed stage run is tried again this often, after this wait, when its failure may pass (transient).
RETRIES, RETRY_DELAY_S = 2, 10


def transient(_task, _task_run, state) -> bool:
    """Whether a failed stage run is worth another try: not for bad input (a UserError fails the same way
    again), yes for the rest (out of memory, a lost worker or file system) and for an output another run
    kept locked past the wait (VLAP_LOCK_TIMEOUT)."""
    try:
        state.result()
    except LockTimeoutError:
        return True
    except USER_ERRORS:
        return False
    except Exception:  # noqa: BLE001  (any other failure may pass)
        return True
    return False


# ---------------------------------------------------------------- task keys and outputs
RESULTS = ".prefect-results"  # under the data root: Prefect's results, and the flow's RunRecord


def run_record(dirs: Dirs) -> RunRecord:
    """What each stage's last flow run under `dirs` ran on and wrote. Prefect's cache knows only the key: this
    tells when outputs changed under it (another run with other params, a hand edit), as DVC's outs check."""
    return RunRecord(dirs.root / RESULTS / RUN_RECORD)


def on_repo_data(params: Path, dirs: Dirs) -> bool:
    """The repo's own params.yaml and data/: where dvc.lock is the record of what was run."""
    return params.resolve() == ROOT / "params.yaml" and dirs.root.resolve() == ROOT / "data"


class DvcStatus:
    """`dvc status` of the repo's own pipeline, asked once per flow run and asked again only after a task
    changed an output: a status of the whole graph costs about what one stage's does (seconds each)."""

    _lock = threading.Lock()
    _stale: dict[str, set[str]] = {}  # flow run id -> labels dvc calls changed

    @classmethod
    def up_to_date(cls, label: str, params: Path, dirs: Dirs, flow_run: str) -> bool:
        """The repo's own data and params, and dvc.lock says this stage is up to date: `dvc repro` (or an
        earlier flow run, which commits what it runs there) made these outputs."""
        if not on_repo_data(params, dirs):
            return False
        with cls._lock:
            if flow_run not in cls._stale:
                cls._stale[flow_run] = cls._with_dvc(label, lambda repo: set(repo.status()))
            return label not in cls._stale[flow_run]

    @classmethod
    def commit(cls, label: str) -> None:
        """Record the stage's run in dvc.lock (and its outputs in DVC's cache), as `dvc repro` would have:
        a `dvc repro` after this flow then runs nothing it ran."""
        cls._with_dvc(label, lambda repo: repo.commit(label, force=True))
        logging.getLogger("vlap.flow").info("%s: recorded in dvc.lock", label)

    @staticmethod
    def _with_dvc(label: str, ask: Callable[[Any], Any]) -> Any:
        """`ask(repo)` on the repo's DVC. While another dvc command holds DVC's lock (a `dvc repro` running a
        stage), it cannot: wait for it (saying so) as long as the output locks would."""
        from dvc.lock import LockError
        from dvc.repo import Repo

        timeout, said = lock_timeout(), False
        deadline = time.monotonic() + timeout if timeout >= 0 else float("inf")
        while True:
            try:
                with Repo(str(ROOT)) as repo:
                    return ask(repo)
            except LockError as err:
                if time.monotonic() > deadline:
                    raise LockTimeoutError(f"{ROOT}: dvc status: {str(err).splitlines()[0]}") from None
                if not said:
                    logging.getLogger("vlap.flow").warning(
                        "%s: waiting for another dvc command on %s to release DVC's lock (%s)", label, ROOT,
                        str(err).splitlines()[0])
                    said = True
                time.sleep(1.0)

    @classmethod
    def forget(cls, flow_run: str) -> None:
        with cls._lock:
            cls._stale.pop(flow_run, None)


def run_stage_task(stage: str, params: str, data: str, method: str | None) -> Any:
    """One stage run, as dvc.yaml's command would do it (params read and validated here)."""
    node, dirs, cfg = next(n for n in graph() if n.spec.name == stage), Dirs.under(data), load_config(params)
    label, flow_run = node.spec.label(method), str(get_run_context().task_run.flow_run_id)
    before = node.outputs_digest(method, dirs)
    if DvcStatus.up_to_date(label, Path(params), dirs, flow_run):
        get_run_logger().info("%s: up to date in dvc.lock, not run", label)
        result = {"up_to_date_in_dvc": True}
    else:
        result = run_stage(node.module, cfg, dirs, method)
        if on_repo_data(Path(params), dirs):
            DvcStatus.commit(label)
    if node.outputs_digest(method, dirs) != before:  # what dvc said of the stages downstream may no longer hold
        DvcStatus.forget(flow_run)
    run_record(dirs).record(node, method, cfg, dirs)
    return result


# Results are stored as plain JSON (no pickle, and no Prefect object hook that imports a class named in
# the file): a result file from elsewhere can at worst be wrong data, never code that runs.
RESULTS_AS_JSON = JSONSerializer(object_encoder=None, object_decoder=None)
STAGE_TASK: Task = task(run_stage_task, persist_result=True, cache_result_in_memory=False,
                        result_serializer=RESULTS_AS_JSON, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S,
                        retry_condition_fn=transient)


def trusted_result_key(key: str, store: Path) -> str:
    """`key`, once the result file under it (if any) is one this flow writes: a JSON record whose
    serializer is plain JSON. Prefect deserialises a record with the serializer the record itself names,
    so a pickle (or a Prefect object hook) in a file from elsewhere would run code: such a file is moved
    aside to <key>.refused, with a warning, and the stage runs instead."""
    path = store / key
    if not path.is_file():
        return key
    try:
        serializer = json.loads(path.read_bytes())["metadata"]["serializer"]
        trusted = (serializer["type"] == "json" and serializer.get("jsonlib") == "json"
                   and serializer.get("object_decoder") is None and not serializer.get("loads_kwargs"))
    except (ValueError, KeyError, TypeError):
        trusted = False
    if not trusted:
        path.replace(path.with_name(f"{key}.refused"))
        logging.getLogger("vlap.flow").warning(
            "%s: not a JSON result this flow wrote; moved aside to %s.refused, never read, and the stage runs",
            path, key)
    return key


def stage_task(node: Node, method: str | None, cfg: Config, dirs: Dirs, retries: int = RETRIES,
               retry_delay_s: float = RETRY_DELAY_S) -> Task:
    """The task of one stage run: keyed on its inputs (evaluated when it starts, after its upstream),
    results kept under <data>/.prefect-results, forced to re-run when an output is missing or was changed;
    a transient failure is tried again `retries` times."""
    stale = node.spec.always_changed or run_record(dirs).outputs_changed(node, method, dirs)
    store = dirs.root / RESULTS
    return STAGE_TASK.with_options(
        name=node.spec.name, task_run_name=node.spec.label(method), result_storage=store, retries=retries,
        retry_delay_seconds=retry_delay_s,
        cache_key_fn=lambda _ctx, _params: trusted_result_key(node.declared_inputs_digest(method, cfg, dirs), store),
        refresh_cache=True if stale else None)


def upstream(nodes: list[Node], node: Node, method: str | None, dirs: Dirs) -> list[str]:
    """Labels of the stage runs whose outputs this stage reads: a dep at, above or below one of their outs."""
    found = []
    deps = node.spec.dep_paths(dirs, method)
    for other in nodes:
        for m in other.instances():
            outs = other.spec.out_paths(dirs, m)
            if any(d == o or d in o.parents or o in d.parents for d in deps for o in outs):
                found.append(other.spec.label(m))
    return found


@flow(name="vlap-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def vlap_pipeline(params: str = "params.yaml", data: str = "data", retries: int = RETRIES) -> dict:
    """The whole graph; returns {stage label: what its run returned}."""
    cfg, root = load_config(params), Path(data).resolve()
    dirs = Dirs.under(root)
    nodes = graph()
    futures = {}
    for node in nodes:  # graph order is DAG order: a FIFO pool never holds a task whose upstream is queued
        for method in node.instances():
            wait_for = [futures[u] for u in upstream(nodes, node, method, dirs)]
            futures[node.spec.label(method)] = stage_task(node, method, cfg, dirs, retries).submit(
                node.spec.name, str(params), str(root), method, wait_for=wait_for)
    # Results in DAG order: the first failure raised is the cause, not a downstream "NotReady".
    return {label: f.result() for label, f in futures.items()}


def wait_until_recorded(flow_run_id, expected: int, timeout_s: float = 30.0) -> None:
    """Block until the API holds every task run of the flow run in a final state. Task-run states reach the
    server as events a background service writes; a process that exits first stops its temporary server
    mid-write (a logged traceback, a run missing from the history)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) >= expected and all(r.state is not None and r.state.is_final() for r in runs):
                return
            time.sleep(0.2)
    logging.getLogger("vlap.flow").warning("the Prefect API has not recorded every task run after %.0f s",
                                           timeout_s)


class ServerStartError(UserError):
    """Prefect's temporary API server did not answer in time."""


def server_start_error(err: RuntimeError) -> ServerStartError | None:
    """The one-line fix for Prefect's "Timed out ... ephemeral Prefect API server" (None for other errors)."""
    if "ephemeral Prefect API server" not in str(err):
        return None
    waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", SERVER_STARTUP_S)
    return ServerStartError(
        f"Prefect's temporary API server did not answer within {waited} s (a loaded machine?): start one with "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or allow longer with "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


def run_flow(params: str, data: str, dask: bool, workers: int = MAX_WORKERS, retries: int = RETRIES) -> dict:
    """The flow, returning once its result is known and its history is recorded; a failed run raises."""
    runner = dask_runner(workers) if dask else ThreadPoolTaskRunner(max_workers=workers)
    runnable = vlap_pipeline.with_options(task_runner=runner)
    try:
        state = runnable(params=params, data=data, retries=retries, return_state=True)
    except RuntimeError as err:
        raise (server_start_error(err) or err) from None
    if state.is_completed():  # a failed run's unstarted tasks never reach a final state: nothing to wait for
        wait_until_recorded(state.state_details.flow_run_id, sum(len(node.instances()) for node in graph()))
    return state.result()  # raises the first failure


def dask_runner(workers: int = MAX_WORKERS) -> TaskRunner:
    """prefect-dask's runner on a local Dask cluster (`workers` processes; 1: Dask's own choice); imported only
    when asked for."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("--dask needs the prefect-dask package (pip install prefect-dask)") from None
    return DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1}  # parallel processes, not threads
                          | ({"n_workers": workers} if workers > 1 else {}))


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
    p.add_argument("--workers", type=int, default=MAX_WORKERS, help="stage runs at once (threads; with --dask, "
                   "Dask worker processes)")
    p.add_argument("--retries", type=int, default=RETRIES, help="further tries of a stage run whose failure may pass "
                   "(not bad input)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # as the dvc stages do

    def body() -> None:
        load_config(args.params)  # a bad params file fails in one line, before Prefect starts
        if args.deploy:
            serve_deployment(args.params, args.data)
        elif on_repo_data(Path(args.params), Dirs.under(args.data)):
            with repo_run_lock(ROOT, "python -m vlap.flow"):  # one run at a time on the repo's data (vlap/repro.py)
                run_flow(args.params, args.data, args.dask, args.workers, args.retries)
        else:
            run_flow(args.params, args.data, args.dask, args.workers, args.retries)

    return report_user_errors(body)


if __name__ == "__main__":
    sys.exit(main())
