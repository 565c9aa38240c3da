"""The cells of a study (one seed × method or variant) or of a tuning grid (one setting) as Dask tasks.

`vlap study --workers N` / `vlap tune --workers N` start a LocalCluster of N single-threaded worker
processes (`--scheduler ADDRESS`: an existing cluster's workers instead) through the Dask client that
extraction uses (pipeline.extraction.ShardCluster), and run every cell as one task. Each worker is placed
on its own device: with `train.device` auto or cuda on a machine with GPUs, the k-th worker of its machine
computes on cuda:(k mod the GPU count) (`evaluate.common.device` auto or cuda follows it); on the CPU each
worker's torch computes on its share of the machine's cores (cores // its machine's workers, at least 1;
`threads` sets another count). A worker loads the LLM once, on its first cell, and reuses it for the
cells it runs after. A cell writes only into its own outputs and records them in its data root's record
as a serial run does (stages.graph.RunRecord, under a file lock), so a re-run, with or without workers,
skips the cells that finished.
"""
from __future__ import annotations

import os
import uuid
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch

from pipeline.extraction import ShardCluster, tls_security

# Where the cells run, and on how many threads: left out of the command a study records, which (as a
# serial run's never did) does not say the thread count either.
PLACEMENT_OPTIONS = ("--workers", "--scheduler", "--threads")


class CellCluster(ShardCluster):
    """`workers` local single-threaded worker processes, or the workers of the cluster at `scheduler`; its
    workers may start processes of their own (the training's batch readers, `train.loader_workers`)."""

    def __init__(self, workers: int = 0, scheduler: str = "", security=None, threads: int | None = None):
        import importlib

        import dask

        # distributed's defaults into dask.config first: the setting below then replaces one value, and
        # undoing it restores that value (set before them, undoing it would remove all of them)
        importlib.import_module("distributed")

        # Dask makes worker processes daemonic by default, and a daemonic process may not start the
        # DataLoader's reader processes. Held while the cluster lives: a nanny reads it on every (re)start.
        self._config = dask.config.set({"distributed.worker.daemon": False})
        self._config.__enter__()
        try:
            super().__init__(workers, scheduler, security)
            self.client.wait_for_workers(workers if self.cluster is not None else 1, timeout=300)
        except BaseException:
            self._config.__exit__(None, None, None)
            raise
        self.threads = threads  # None: each worker's share of its machine's cores

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._config.__exit__(None, None, None)

    def placement(self) -> dict[str, tuple[int, int]]:
        """worker address -> (its rank among the workers of its machine, how many its machine has)."""
        hosts: dict[str, list[tuple]] = {}
        for address, info in self.client.scheduler_info(n_workers=-1)["workers"].items():
            name = info.get("name", address)
            hosts.setdefault(info.get("host", address), []).append((_name_order(name), address))
        return {address: (rank, len(members)) for members in hosts.values()
                for rank, (_, address) in enumerate(sorted(members))}

    def map(self, cells: Sequence[tuple[Callable, tuple]], llm: str, device: str,
            on_done: Callable[[int, Any], None] | None = None) -> list:
        """`fn(*args, lm=...)` for every cell (fn, args), as tasks: its worker's LLM `llm` on the worker's device
        (`device`: train.device). `on_done(i, result)` runs here as each cell finishes. Every cell runs to its end, then
        the first failure (in cell order) is raised as the cell raised it; the finished cells are kept."""
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]  # a fresh key per call: never the result of an earlier call's task
        placement = self.placement()
        futures = {self.client.submit(run_cell, fn, args, llm, device, self.threads, placement,
                                      key=f"cell-{getattr(fn, '__name__', 'fn')}-{run}-{i}", pure=False): i
                   for i, (fn, args) in enumerate(cells)}
        results, failed = [None] * len(cells), {}
        for future in as_completed(futures):
            i = futures[future]
            if future.status == "finished":
                results[i] = future.result()
                if on_done is not None:
                    on_done(i, results[i])
            else:
                failed[i] = future
        if failed:
            failed[min(failed)].result()  # raises the cell's own exception
        return results


def _name_order(name) -> tuple:
    """Workers named 0, 1, ... (a LocalCluster's) in that order, before any other name."""
    text = str(name)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def cluster_for(workers: int, scheduler: str, extract_cfg, threads: int | None = None) -> CellCluster | None:
    """The cluster `--workers` / `--scheduler` ask for, or None for the in-process serial run (workers <= 1,
    no scheduler; `threads`, when given, is then this process's torch thread count). A tls:// scheduler is
    reached with the extraction's TLS files (`extract.tls_*`)."""
    if threads is not None and threads < 1:
        from pipeline.errors import ConfigError

        raise ConfigError(f"--threads {threads}: needs at least 1")
    if not scheduler and workers <= 1:
        if threads is not None:
            torch.set_num_threads(threads)
        return None
    security = tls_security(scheduler, extract_cfg.tls_ca_file, extract_cfg.tls_cert, extract_cfg.tls_key)
    return CellCluster(workers if not scheduler else 0, scheduler, security, threads)


def add_placement_options(parser) -> None:
    """`--workers`, `--scheduler`, `--threads` on a command's parser."""
    parser.add_argument("--workers", type=int, default=1, help="cells run at once: a local Dask cluster of N "
                        "single-threaded worker processes, each on its own GPU or share of the cores (default 1: "
                        "one cell after another in this process)")
    parser.add_argument("--scheduler", default="", help="tcp:// or tls:// address of a running Dask scheduler whose "
                        "workers run the cells instead (tls://: with extract.tls_* of params)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each cell (default: serial, "
                        "torch's own; on workers, their machine's cores // its workers); the same count gives the "
                        "same bytes")


def recorded_command(prog: str, argv: list[str]) -> str:
    """The command as a study records it: without the options that only say where its cells run."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in PLACEMENT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in PLACEMENT_OPTIONS)):
            kept.append(arg)
    return " ".join([prog, *kept])


# ---------------------------------------------------------------- on the worker
def worker_device(spec: str, rank: int) -> torch.device:
    """The device a worker's cells compute on: its own GPU for `auto` / `cuda` where there are GPUs (made the
    process's current one, so `cuda` and `auto` elsewhere in the config mean it too), else `spec` itself."""
    from pipeline.device import resolve_device

    if spec in ("auto", "cuda") and torch.cuda.is_available():
        index = rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return resolve_device(spec)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def worker_lm(llm: str, device: str):
    """The worker's LLM, loaded on its first cell and kept for the next ones."""
    from pipeline.lms import load_lm

    return load_lm(llm, torch.device(device))


def run_cell(fn: Callable, args: tuple, llm: str, device: str, threads: int | None,
             placement: dict[str, tuple[int, int]]) -> Any:
    """A Dask task: one cell, on this worker's device and its share of the cores."""
    from distributed import get_worker

    from pipeline.runtime import keep_freed_memory

    keep_freed_memory()
    worker = get_worker()
    rank, per_host = placement.get(worker.address, (_name_order(worker.name)[1], len(placement) or 1))
    torch.set_num_threads(threads or max(1, cpu_cores() // per_host))
    return fn(*args, lm=worker_lm(llm, str(worker_device(device, rank))))
