"""`vlap ablate`: VLAP's settings one factor at a time around params.yaml, as queued DVC experiments.

    vlap ablate [--factor methods.vlap.ap_weight=0.01,1 ...] [--set train.steps=100 ...] [--seeds 0 1]
                [--jobs 1] [--out data/ablation]
    vlap ablate --report            # only the table and plots, from the experiments that finished

Queues one `dvc exp run --queue` per (setting, seed), plus the unchanged setting, each limited to
VLAP's own stages (train@vlap and its four evaluations: the baselines do not depend on these
settings), runs the queue (`dvc queue start`), waits for it, and writes `<out>/report.md` (one row
per setting, every headline metric, the change from the unchanged setting), `ablation.json` and one
plot per headline metric against each setting. Features are never re-encoded: the experiments
check the cached outputs out of the DVC cache. Experiments named `abl-...` that already exist on
this commit are kept, so a re-run only queues what is missing. Without --factor the grid is
GRID: lambda, epsilon, Sinkhorn iterations, the prior and the prototype subset.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import load_config, parse_config, value_at
from pipeline.errors import ConfigError, UserError, report_user_errors
from pipeline.io import write_json_atomic
from pipeline.report import figure, save_figure, write_markdown
from pipeline.methods import PROPOSED
from pipeline.tasks.registry import HEADLINES, TASKS
from pipeline.tasks.summary import headline_values
from vlap.params_file import parse_assignment, with_overrides

log = logging.getLogger("vlap.ablate")


# The states `dvc queue status` prints in its last column; seconds between two looks at the queue.
QUEUE_STATES = ("Queued", "Running", "Success", "Failed", "Killed")
POLL_S = 5


class DvcError(UserError):
    """A dvc command the ablation runs failed, or left nothing to report."""

GRID = {  # params key -> the values tried besides the one params.yaml gives
    "methods.vlap.ap_weight": ["0.01", "1.0"],
    "methods.vlap.epsilon": ["0.003", "0.05"],
    "methods.vlap.sinkhorn_iters": ["1", "10"],
    "prototypes.prior": ["uniform"],
    "prototypes.temperature": ["0.5", "1.0"],  # mu ∝ df^T; T = 1 is the paper's plain reading
    "prototypes.subset": ["corpus"],
}
TARGETS = [f"evaluate_{task}@{PROPOSED}" for task in TASKS]
PLOTTED = ["caption/CIDEr", "vqa/0shot_open_accuracy", "retrieval/assignment_i2t_R@1", "retrieval/assignment_t2i_R@1",
           "arithmetic/color_swap_top1", "arithmetic/word_swap_top1"]
UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Setting:
    """One queued experiment: `key=value` (key None: the unchanged setting) with one training seed."""

    key: str | None
    value: str | None
    seed: int | None

    @property
    def name(self) -> str:
        """A git-ref-safe experiment name, e.g. abl-ap_weight-0p01 or abl-unchanged-s1."""
        base = UNCHANGED if self.key is None else f"{self.key.split('.')[-1]}-{self.value}"
        safe = "".join(c if c.isalnum() or c in "-_" else "p" if c == "." else "_" for c in base)
        return f"abl-{safe}" + ("" if self.seed is None else f"-s{self.seed}")

    def overrides(self, sets: list[str]) -> list[str]:
        return list(sets) + ([] if self.key is None else [f"{self.key}={self.value}"]) + (
            [] if self.seed is None else [f"train.seed={self.seed}"])


def plan(params: Path, grid: dict[str, list[str]], sets: list[str], seeds: list[int] | None) -> list[Setting]:
    """Every (setting, seed) to run, each checked against the config schema before anything is queued."""
    raw = yaml.safe_load(params.read_text())
    settings = [Setting(None, None, s) for s in (seeds or [None])]
    settings += [Setting(k, v, s) for k, values in grid.items() for v in values for s in (seeds or [None])]
    for setting in settings:
        try:
            parse_config(with_overrides(raw, setting.overrides(sets)), source=f"{params} with {setting.name}")
        except ConfigError as err:
            raise ConfigError(f"ablation setting {setting.name}: {err}") from None
    return settings


def dvc(*args: str, capture: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=capture, text=True)
    if proc.returncode != 0:
        raise DvcError(f"dvc {' '.join(args)} failed: {(proc.stderr or proc.stdout or '').strip()[-2000:]}")
    return proc.stdout or ""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def experiment_refs(baseline: str) -> dict[str, str]:
    """name -> commit of every finished DVC experiment run from `baseline`, as `dvc exp show` lists them."""
    import dvc.api

    rows = dvc.api.exp_show(revs=baseline, force=True)
    return {r["Experiment"]: r["rev"] for r in rows
            if r.get("Experiment") and r.get("typ") != "baseline" and r.get("State") in (None, "Success")}


def queue(settings: list[Setting], sets: list[str], baseline: str) -> list[Setting]:
    """Queue each setting not already run from this commit or waiting in the queue; returns the settings
    without a finished experiment (those queued now and those already waiting)."""
    done = experiment_refs(baseline)
    queued_names = queue_names()
    todo = [s for s in settings if s.name not in done and s.name not in queued_names]
    for setting in todo:
        args = ["exp", "run", "--queue", "--name", setting.name]
        for item in setting.overrides(sets):
            args += ["-S", item]
        dvc(*args, *TARGETS)
        log.info("queued %s", setting.name)
    return [s for s in settings if s.name not in done]


def queue_states() -> dict[str, str]:
    """name -> status (Queued, Running, Success, Failed, ...) of every experiment `dvc queue status` lists."""
    states = {}
    for line in dvc("queue", "status").splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[0] != "Task" and cols[-1] in QUEUE_STATES:
            states[cols[1]] = cols[-1]
    return states


def queue_names(states: tuple[str, ...] = ("Queued", "Running")) -> set[str]:
    """Names of the experiments `dvc queue status` lists in one of `states`."""
    return {name for name, state in queue_states().items() if state in states}


def run_queue(settings: list[Setting], jobs: int, baseline: str) -> list[str]:
    """Start the queue's workers and wait until none of the settings is queued or running; returns the names
    that failed. One `dvc queue status` a poll: reading the experiments (`dvc exp show`) each time would take
    the CPU from the experiments themselves."""
    from tqdm import tqdm

    dvc("queue", "start", "--jobs", str(jobs))
    wanted = {s.name for s in settings}
    with tqdm(total=len(wanted), desc="ablation experiments", unit="exp") as bar:
        while True:
            states = queue_states()
            bar.n = sum(states.get(name) in ("Success", "Failed") for name in wanted)
            bar.refresh()
            if not any(states.get(name) in ("Queued", "Running") for name in wanted):
                break
            time.sleep(POLL_S)
    finished = wanted & set(experiment_refs(baseline))
    return sorted(wanted - finished)


def shown_at(names: list[str]) -> dict[str, tuple[dict, dict[str, dict]]]:
    """Each experiment's params.yaml and metrics files as DVC shows them at its revision (`dvc params show`,
    `dvc metrics show`): {name: (params, {path: metrics})}, a name missing where DVC could not read it. One
    repo object reads every revision: dvc.api opens the repo and parses dvc.lock anew on every call."""
    from dvc.repo import Repo

    with Repo() as repo:
        metrics = repo.metrics.show(revs=names, on_error="return")
        params = repo.params.show(revs=names, on_error="return")
    shown = {}
    for name in names:
        files = metrics.get(name, {}).get("data", {})
        values = params.get(name, {}).get("data", {}).get("params.yaml", {}).get("data")
        if values is not None:
            shown[name] = (values, {path: entry["data"] for path, entry in files.items() if "data" in entry})
    return shown


def collect(settings: list[Setting], baseline: str) -> list[dict]:
    """One row per finished setting: its key, value, seed, the resolved value it ran with, and VLAP's
    headline metrics, as DVC shows the experiment's params and metrics."""
    refs, rows = experiment_refs(baseline), []
    finished = [s for s in settings if s.name in refs]
    shown = shown_at([s.name for s in finished])
    for setting in finished:
        if setting.name not in shown:
            log.warning("%s: DVC could not read its params or metrics; left out of the table", setting.name)
            continue
        params, files = shown[setting.name]
        cfg = parse_config(params, source=f"params.yaml of {setting.name}")
        metrics = {}
        for task in HEADLINES:
            found = files.get(f"data/metrics/{task}/{PROPOSED}.json")
            if found and found.get("applicable", True):
                metrics |= {k: v for k, v in headline_values(found, task)[0].items() if isinstance(v, (int, float))}
        train = files.get(f"data/metrics/train/{PROPOSED}/metrics.json") or {}
        metrics |= {f"train/{k}": v for k, v in train.get("train", {}).items() if k in ("loss_cap", "loss_ap")}
        rows.append({"experiment": setting.name, "commit": refs[setting.name], "key": setting.key,
                     "value": setting.value, "seed": cfg.train.seed, "resolved": resolved(cfg, setting.key),
                     "metrics": metrics})
    return rows


def resolved(cfg, key: str | None):
    return None if key is None else value_at(cfg, key)


def averaged(rows: list[dict]) -> list[dict]:
    """Rows of the same setting over seeds: the mean of each metric, and its min and max."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["key"], row["value"]), []).append(row)
    out = []
    for (key, value), group in groups.items():
        names = sorted({m for r in group for m in r["metrics"]})
        values = {m: [r["metrics"][m] for r in group if m in r["metrics"]] for m in names}
        out.append({"key": key, "value": value, "seeds": [r["seed"] for r in group],
                    "mean": {m: sum(v) / len(v) for m, v in values.items()},
                    "range": {m: (min(v), max(v)) for m, v in values.items()}})
    return out


def markdown(table: list[dict], unchanged_values: dict[str, object], header: str) -> str:
    """Metrics as rows, settings as columns: the unchanged setting's value, then each other setting's
    value with its change from it in brackets."""
    base = next(r for r in table if r["key"] is None)
    others = [r for r in table if r["key"] is not None]
    labels = ["unchanged"] + [f"{r['key'].split('.')[-1]}={r['value']}" for r in others]
    lines = [header, "", "Unchanged setting: " + ", ".join(f"`{k}={v}`" for k, v in unchanged_values.items()) + ".",
             "", "| metric | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for metric in base["mean"]:
        b = base["mean"][metric]
        cells = [f"{b:.4g}"]
        for row in others:
            v = row["mean"].get(metric)
            cells.append("–" if v is None else f"{v:.4g} ({v - b:+.3g})")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    seeds = sorted({s for r in table for s in r["seeds"]})
    lines += ["", f"Each cell: VLAP's metric (mean over training seeds {seeds}) and, in brackets, its change from "
              "the unchanged setting. One factor changes per column; the rest is params.yaml plus the overrides."]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], unchanged_values: dict[str, object], out: Path) -> list[Path]:
    """One PNG per plotted headline metric: a panel per factor, the metric against the factor's values."""
    base = next(r for r in table if r["key"] is None)
    factors = list(dict.fromkeys(r["key"] for r in table if r["key"] is not None))
    written = []
    for metric in [m for m in PLOTTED if m in base["mean"]]:
        fig, axes = figure(1, len(factors), figsize=(max(4.0, 2.6 * len(factors)), 2.6), squeeze=False, sharey=True)
        for ax, key in zip(axes[0], factors):
            points = [(str(unchanged_values[key]), base)] + [(r["value"], r) for r in table if r["key"] == key]
            points.sort(key=lambda p: sort_key(p[0]))
            xs = list(range(len(points)))
            means = [p[1]["mean"].get(metric, float("nan")) for p in points]
            lows = [m - p[1]["range"].get(metric, (m, m))[0] for m, p in zip(means, points)]
            highs = [p[1]["range"].get(metric, (m, m))[1] - m for m, p in zip(means, points)]
            ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3)
            ax.plot([xs[[p[1] is base for p in points].index(True)]], [base["mean"].get(metric)], "r*", ms=10)
            ax.set_xticks(xs, [p[0] for p in points], fontsize=8)
            ax.set_title(key.split(".")[-1], fontsize=9)
        axes[0][0].set_ylabel(metric, fontsize=8)
        fig.suptitle(f"VLAP {metric} (star: unchanged setting)", fontsize=9)
        fig.tight_layout()
        path = out / f"{metric.replace('/', '_').replace('@', '')}.png"
        save_figure(fig, path, dpi=110)
        written.append(path)
    return written


def sort_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def report(settings: list[Setting], params: Path, sets: list[str], out: Path, baseline: str) -> dict:
    rows = collect(settings, baseline)
    if not any(r["key"] is None for r in rows):
        raise DvcError("the unchanged setting has no finished experiment: nothing to compare with "
                           "(see `dvc queue status` and `dvc queue logs abl-unchanged`)")
    cfg = parse_config(with_overrides(yaml.safe_load(params.read_text()), sets), source=str(params))
    unchanged_values = {k: resolved(cfg, k) for k in dict.fromkeys(s.key for s in settings if s.key)}
    table = averaged(rows)
    header = (f"# VLAP ablation: one factor at a time\n\nBaseline commit {baseline[:7]}"
              f"; overrides for every experiment: {', '.join(sets) or 'none'}.")
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / "report.md", markdown(table, unchanged_values, header))
    result = {"sets": sets, "unchanged": unchanged_values, "experiments": rows, "table": table}
    write_json_atomic(out / "ablation.json", result)
    result["plots"] = [str(p) for p in plot(table, unchanged_values, out)]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlap ablate", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", type=Path)
    p.add_argument("--factor", action="append", default=[], metavar="KEY=V1,V2",
                   help="a factor and the values to try (repeatable; default: the GRID in vlap/ablate.py)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="an override for every experiment, e.g. train.steps=100 (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed values (default: params' own)")
    p.add_argument("--jobs", type=int, default=1, help="experiments run at once (dvc queue start --jobs)")
    p.add_argument("--out", default=Path("data/ablation"), type=Path)
    p.add_argument("--report", action="store_true", help="only write the report from finished experiments")
    p.add_argument("--baseline", default="HEAD", help="with --report: the commit the experiments ran from "
                                                      "(default: HEAD)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return report_user_errors(lambda: ablate(args))


def ablate(args: argparse.Namespace) -> None:
    grid = dict(parse_assignment(f) for f in args.factor) if args.factor else GRID
    for item in args.sets:
        parse_assignment(item)
    load_config(args.params)
    settings = plan(args.params, grid, args.sets, args.seeds)
    if args.baseline != "HEAD" and not args.report:
        raise ConfigError("--baseline applies to --report: experiments are queued from HEAD")
    baseline = git("rev-parse", args.baseline).strip()  # fixed now: commits made while the queue runs do not move it
    if not args.report:
        unfinished = queue(settings, args.sets, baseline)
        for name in run_queue(unfinished, args.jobs, baseline) if unfinished else []:
            log.error("experiment %s failed: see `dvc queue logs %s`", name, name)
    result = report(settings, args.params, args.sets, args.out, baseline)
    print((args.out / "report.md").read_text())
    log.info("wrote %s, ablation.json and %d plots", args.out / "report.md", len(result["plots"]))

if __name__ == "__main__":
    sys.exit(main())
