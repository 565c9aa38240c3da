"""The Prefect flow: the stages of `stages.graph` as Prefect tasks, cached on DVC's own inputs.

    python -m vlap.flow [--params params.yaml] [--data data] [--dask] [--workers N] [--per-device N]
                        [--retries R] [--retry-delay S] [--target LABEL ...]
    python -m vlap.flow --dask --scheduler tcp://host:8786   # an existing Dask cluster (tls:// too)
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
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

from filelock import FileLock, Timeout  # noqa: E402
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
# A failed stage run is tried again this often when its failure may pass (transient), after a wait that
# triples each time: RETRY_DELAY_S, then 3x, 9x (10 s, 30 s, 90 s). VLAP_RETRY_DELAY_S (or --retry-delay) sets
# the first wait: tests shorten it.
RETRIES, RETRY_DELAY_S, RETRY_BACKOFF = 3, 10.0, 3
RETRY_DELAY_ENV = "VLAP_RETRY_DELAY_S"


def retry_delays(retries: int, first_s: float | None = None) -> list[float]:
    """The wait before each further try: `first_s` (default VLAP_RETRY_DELAY_S, else RETRY_DELAY_S), x3 each time."""
    if first_s is None:
        first_s = float(os.environ.get(RETRY_DELAY_ENV) or RETRY_DELAY_S)
    return [first_s * RETRY_BACKOFF ** k for k in range(max(retries, 1))]


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    text = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def transient(task_, task_run, state) -> bool:
    """Whether a failed stage run is worth another try: not for bad input (a UserError fails the same way
    again), yes for the rest (out of memory, a lost worker or file system) and for an output another run
    kept locked past the wait (VLAP_LOCK_TIMEOUT). Prefect asks only while tries are left; a yes is logged
    as one line: the stage, the try that failed, why, and the wait before the next."""
    try:
        state.result()
    except USER_ERRORS as err:
        if not isinstance(err, LockTimeoutError):
            return False
        reason = one_line(err)
    except Exception as err:  # noqa: BLE001  (any other failure may pass)
        reason = one_line(err)
    else:
        return False
    tried = max(task_run.run_count, 1)
    delays = task_.retry_delay_seconds
    delay = (delays[min(tried - 1, len(delays) - 1)] if isinstance(delays, (list, tuple)) else delays) or 0
    retry_logger(task_, task_run).warning("%s: try %d of %d failed (%s); trying again in %g s", task_run.name,
                                          tried, task_.retries + 1, reason, delay)
    return True


def retry_logger(task_, task_run) -> logging.Logger | logging.LoggerAdapter:
    """The task run's Prefect logger (the console and the run's logs in the UI), or vlap.flow's outside one."""
    try:
        from prefect.logging.loggers import task_run_logger

        return task_run_logger(task_run, task=task_)
    except Exception:  # noqa: BLE001  (no run context: still say it)
        return logging.getLogger("vlap.flow")


# ---------------------------------------------------------------- one device, a few stage runs at a time
# A stage run holds one of `per_device` slots of the device it computes on (its section's device param, `auto`
# resolved where it runs; a stage without one computes on the CPU) for as long as it runs: with --workers 4,
# at most `per_device` stage runs share a GPU, or the CPU, at once. A slot is an exclusive flock on one of
# `per_device` files in a folder of the machine (VLAP_DEVICE_LOCKS, default <tmp>/vlap-device-locks), so it
# holds across the flow's threads and across Dask worker processes on one machine, each machine's devices
# counted apart, and the kernel lets it go when its holder dies (a killed Dask worker frees its GPU at once).
# Not Prefect's concurrency limits: its global and tag limits are named on the API server, so one name is one
# count across every machine of a cluster, not one per machine's device; a slot is a lease, which a killed
# worker keeps until it expires (minutes) while the stage waits to run again elsewhere; and every try to take
# one is a call to the server. Not Dask resources: they count only on workers started with matching
# `--resources`, so a flow on an existing cluster whose workers lack them would wait for ever.
DEVICE_LOCKS_ENV, PER_DEVICE = "VLAP_DEVICE_LOCKS", 1


def stage_device(node: Node, method: str | None, cfg: Config) -> str:
    """The device a stage run computes on, as a lock name: `cpu`, `cuda:0`... From the first of its declared
    params that is a device or a section with one (train.device, evaluate.common.device, extract.device...)."""
    spec = "cpu"
    for key in node.spec.param_keys(method):
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and key.endswith(".device"):
            spec = value
            break
        if hasattr(value, "device") and isinstance(value.device, str):
            spec = value.device
            break
    from pipeline.device import resolve_device

    try:
        device = resolve_device(spec)
    except ConfigError:
        return spec  # the stage itself says what is wrong with it
    return f"{device.type}:{device.index or 0}" if device.type == "cuda" else device.type


@contextlib.contextmanager
def device_slot(device: str, per_device: int, label: str) -> Iterator[None]:
    """Hold one of `per_device` slots of `device` on this machine (0: no limit), waiting for one if need be."""
    if per_device <= 0:
        yield
        return
    folder = Path(os.environ.get(DEVICE_LOCKS_ENV) or Path(tempfile.gettempdir()) / "vlap-device-locks")
    folder.mkdir(parents=True, exist_ok=True)
    name, said = device.replace(":", "-"), False
    while True:
        for k in range(per_device):
            lock = FileLock(str(folder / f"{name}.{k}.lock"), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                continue
            try:
                yield
            finally:
                lock.release()
            return
        if not said:
            logging.getLogger("vlap.flow").info("%s: waiting for %s (%d stage run%s at a time)", label, device,
                                                per_device, "" if per_device == 1 else "s")
            said = True
        time.sleep(0.2)


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


def run_stage_task(stage: str, params: str, data: str, method: str | None, per_device: int = PER_DEVICE) -> Any:
    """One stage run, as dvc.yaml's command would do it (params read and validated here), holding a slot of
    its device."""
    node, dirs, cfg = next(n for n in graph() if n.spec.name == stage), Dirs.under(data), load_config(params)
    label, flow_run = node.spec.label(method), str(get_run_context().task_run.flow_run_id)
    before = node.outputs_digest(method, dirs)
    if DvcStatus.up_to_date(label, Path(params), dirs, flow_run):
        get_run_logger().info("%s: up to date in dvc.lock, not run", label)
        result = {"up_to_date_in_dvc": True}
    else:
        with device_slot(stage_device(node, method, cfg), per_device, label):
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
                        result_serializer=RESULTS_AS_JSON, retries=RETRIES,
                        retry_delay_seconds=[RETRY_DELAY_S * RETRY_BACKOFF ** k for k in range(RETRIES)],
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
               retry_delay_s: float | None = None) -> Task:
    """The task of one stage run: keyed on its inputs (evaluated when it starts, after its upstream),
    results kept under <data>/.prefect-results, forced to re-run when an output is missing or was changed;
    a transient failure is tried again `retries` times, the first after `retry_delay_s` (retry_delays)."""
    stale = node.spec.always_changed or run_record(dirs).outputs_changed(node, method, dirs)
    store = dirs.root / RESULTS
    return STAGE_TASK.with_options(
        name=node.spec.name, task_run_name=node.spec.label(method), result_storage=store, retries=retries,
        retry_delay_seconds=retry_delays(retries, retry_delay_s),
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


def selected(nodes: list[Node], targets: list[str] | None, dirs: Dirs) -> set[str]:
    """Labels of the stage runs a flow with these targets runs: each target and, transitively, its upstream
    (every stage run when there are none). A target may be a label (train@vlap) or a stage's name (train)."""
    instances = {n.spec.label(m): (n, m) for n in nodes for m in n.instances()}
    if not targets:
        return set(instances)
    todo = []
    for target in targets:
        found = [label for label in instances if label == target or label.split("@")[0] == target]
        if not found:
            raise ConfigError(f"--target: no stage run {target!r} (one of {', '.join(instances)})")
        todo += found
    wanted: set[str] = set()
    while todo:
        label = todo.pop()
        if label not in wanted:
            wanted.add(label)
            todo += upstream(nodes, *instances[label], dirs)
    return wanted


@flow(name="vlap-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))
def vlap_pipeline(params: str = "params.yaml", data: str = "data", retries: int = RETRIES,
                  retry_delay_s: float | None = None, per_device: int = PER_DEVICE,
                  targets: list[str] | None = None) -> dict:
    """The whole graph, or `targets` and what they read (as `dvc repro TARGET...`); returns {stage label: what
    its run returned}."""
    cfg, root = load_config(params), Path(data).resolve()
    dirs = Dirs.under(root)
    nodes = graph()
    wanted = selected(nodes, targets, dirs)
    futures = {}
    for node in nodes:  # graph order is DAG order: a FIFO pool never holds a task whose upstream is queued
        for method in node.instances():
            if node.spec.label(method) not in wanted:
                continue
            wait_for = [futures[u] for u in upstream(nodes, node, method, dirs)]
            futures[node.spec.label(method)] = stage_task(node, method, cfg, dirs, retries, retry_delay_s).submit(
                node.spec.name, str(params), str(root), method, per_device, wait_for=wait_for)
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


def run_flow(params: str, data: str, dask: bool, workers: int = MAX_WORKERS, retries: int = RETRIES,
             retry_delay_s: float | None = None, per_device: int = PER_DEVICE, scheduler: str = "",
             targets: list[str] | None = None) -> dict:
    """The flow, returning once its result is known and its history is recorded; a failed run raises.
    `scheduler`: an existing Dask scheduler's address (implies `dask`)."""
    wanted = selected(graph(), targets, Dirs.under(Path(data).resolve()))  # an unknown target: one line, first
    runner = dask_runner(workers, scheduler, load_config(params)) if dask or scheduler else \
        ThreadPoolTaskRunner(max_workers=workers)
    runnable = vlap_pipeline.with_options(task_runner=runner)
    try:
        state = runnable(params=params, data=data, retries=retries, retry_delay_s=retry_delay_s,
                         per_device=per_device, targets=targets, return_state=True)
    except RuntimeError as err:
        raise (server_start_error(err) or err) from None
    if state.is_completed():  # a failed run's unstarted tasks never reach a final state: nothing to wait for
        wait_until_recorded(state.state_details.flow_run_id, len(wanted))
    return state.result()  # raises the first failure


def dask_runner(workers: int = MAX_WORKERS, scheduler: str = "", cfg: Config | None = None) -> TaskRunner:
    """prefect-dask's runner: on the existing Dask scheduler at `scheduler` (tls:// with extract.tls_*'s
    certificates, as the extract stage reaches one), else on a local Dask cluster (`workers` processes;
    1: Dask's own choice); imported only when asked for."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("--dask needs the prefect-dask package (pip install prefect-dask)") from None
    if scheduler:
        from pipeline.extraction import tls_security

        ext = (cfg or Config()).extract
        security = tls_security(scheduler, ext.tls_ca_file, ext.tls_cert, ext.tls_key)
        return DaskTaskRunner(address=scheduler, client_kwargs={"security": security} if security else None)
    import dask

    # Worker processes that may start processes of their own (a stage's data loader, torchrun): not daemons.
    dask.config.set({"distributed.worker.daemon": False})
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
    p.add_argument("--scheduler", default="", help="with --dask: the address of an existing Dask scheduler "
                   "(tcp://host:8786; tls:// with extract.tls_ca_file, tls_cert and tls_key) instead of a local cluster")
    p.add_argument("--per-device", type=int, default=PER_DEVICE, help="stage runs at once on one device (a GPU, or "
                   "the CPU for stages on it) of a machine (default 1; 0: no limit)")
    p.add_argument("--retries", type=int, default=RETRIES, help="further tries of a stage run whose failure may pass "
                   f"(not bad input; default {RETRIES})")
    p.add_argument("--retry-delay", type=float, default=None, help="seconds before the first further try, tripled "
                   f"for each next (default ${RETRY_DELAY_ENV} or {RETRY_DELAY_S:g})")
    p.add_argument("--target", action="append", help="run only this stage run (train@vlap) or stage (train) and "
                   "what it reads; repeatable (default: the whole graph)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # as the dvc stages do

    def body() -> None:
        load_config(args.params)  # a bad params file fails in one line, before Prefect starts
        if args.deploy:
            serve_deployment(args.params, args.data)
        elif on_repo_data(Path(args.params), Dirs.under(args.data)):
            with repo_run_lock(ROOT, "python -m vlap.flow"):  # one run at a time on the repo's data (vlap/repro.py)
                run_flow(args.params, args.data, args.dask, args.workers, args.retries, args.retry_delay,
                         args.per_device, args.scheduler, args.target)
        else:
            run_flow(args.params, args.data, args.dask, args.workers, args.retries, args.retry_delay,
                         args.per_device, args.scheduler, args.target)

    return report_user_errors(body)


if __name__ == "__main__":
    # Through the module's importable name: a task pickled for a Dask worker then names vlap.flow's functions,
    # which the worker imports, not this __main__'s, which it cannot.
    from vlap import flow as importable

    sys.exit(importable.main())
