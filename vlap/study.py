"""`vlap study`: seeds × methods at one training budget on the same cached features, with intervals.

    vlap study [--seeds 0 1 2] [--steps 200] [--test-images 0] [--vqa-questions 500] [--vqa-shots 0]
               [--tuned data/tune/tune.json] [--out data/study] [--workers N | --scheduler ADDRESS] [--threads T]
               [--carry results/study/cells]

Each seed trains every method (the seed sets the bridge's initialisation and the batch order) and
runs every evaluation, in its own data root under `<out>/runs/seed-<s>/` whose prepared data,
features and prototypes are links to the pipeline's own: nothing is encoded again (run
`dvc repro extract prototypes` first). Evaluation settings are the same for every seed, so every method
and seed is scored on the same test items. `--tuned` takes each method's settings from a finished
`vlap tune` made at the study's training budget (and refuses one made at another). The report
(`<out>/report.md`, `study.json`, `intervals.png`) gives each headline metric as mean and 95% interval (pipeline.stats: bootstrap
over seeds and test items) and the paired difference VLAP − each baseline with its interval.
A re-run runs again only the stage runs whose inputs changed: each seed root keeps a record of what
each training and evaluation last ran on (`stages.lock.json`: its declared params, data deps and code
as dvc.lock hashes them, and its outputs' digests), and a stage whose record matches is kept.
Each (seed, method or variant) is a cell: one after another in this process with one LLM, or with
`--workers N` / `--scheduler ADDRESS` each cell a Dask task, each worker on its own GPU or share of the
cores with its own LLM (vlap/cells.py); the outputs and the report are the same bytes either way when
each cell computes on the same number of torch threads (`--threads`). `--carry DIR` moves finished cells
between machines: each cell is copied into DIR as it finishes (commit it), and a study elsewhere restores
them from DIR before it runs; a restored cell is kept only where its recorded digests still hold (vlap/carry.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import stats
from pipeline.config import METHODS, Config, section_values
from pipeline.errors import ConfigError, report_user_errors
from pipeline.methods import PROPOSED
from pipeline.io import write_json_atomic
from pipeline.report import figure, save_figure, write_markdown
from pipeline.paths import Dirs
from pipeline.tasks.registry import HEADLINES, PRIMARY, TASKS
from pipeline.tasks.summary import headline_values, study_setting
from pipeline.train import method_lr
from stages.common import run_stage
from stages.graph import RUN_RECORD, Node, RunRecord, graph
from vlap.cells import CellCluster, add_placement_options, cluster_for, recorded_command
from vlap.carry import CellCarry
from vlap.inputs import require_cached_inputs
from vlap.params_file import load_config_with
from vlap.tune import tuned_settings

log = logging.getLogger("vlap.study")
STAGES = ("train", *(f"evaluate_{task}" for task in TASKS))


def study_config(cfg: Config, seed: int, steps: int | None, test_images: int | None,
                 vqa_questions: int | None, vqa_shots: int | None = None) -> Config:
    """The run's config: the seed and the budget replaced; evaluation the same for every seed."""
    t = dataclasses.replace(cfg.train, seed=seed, **({"steps": steps, "epochs": 0.0} if steps else {}))
    common = cfg.evaluate.common if test_images is None else dataclasses.replace(cfg.evaluate.common,
                                                                                   test_images=test_images)
    vqa = dataclasses.replace(cfg.evaluate.vqa, **{k: v for k, v in (("questions", vqa_questions),
                                                                      ("shots", vqa_shots)) if v is not None})
    return dataclasses.replace(cfg, train=t, evaluate=dataclasses.replace(cfg.evaluate, common=common, vqa=vqa))


def train_and_evaluate(cfg: Config, dirs: Dirs, method: str, lm) -> None:
    """One (seed, method): its training and evaluation stages, each run unless what it last ran on (its
    declared params, data deps and code, as DVC hashes them) and its outputs are unchanged."""
    record = RunRecord(dirs.root / RUN_RECORD)  # dvc.lock's role: DVC runs no stage in a seed root
    for node in study_nodes():
        if record.up_to_date(node, method, cfg, dirs):
            log.info("study: %s seed %d up to date, kept", node.spec.label(method), cfg.train.seed)
            continue
        run_stage(node.module, cfg, dirs, method, lm=lm)
        record.record(node, method, cfg, dirs)


def study_nodes() -> list[Node]:
    """train, then each evaluation, from the pipeline graph."""
    return [n for n in graph() if n.spec.name in STAGES]


# ---------------------------------------------------------------- per-item scores
def per_item_scores(dirs: Dirs, method: str) -> dict[str, dict[str, float]]:
    """metric -> {test item: score} for every task's headline metrics whose per-item scores its stage saved,
    and `<metric>_<domain>` over the items of each domain (zero-shot seen / unseen, NoCaps' domains)."""
    out: dict[str, dict[str, float]] = {}
    domains: dict[str, dict[str, str]] = {}  # metric -> {item: domain}
    stages = {node.spec.name: node.spec for node in graph()}
    for name, task in TASKS.items():
        scores, item_domains = task.per_item(stages[f"evaluate_{name}"].items_path(dirs, method), dirs.prepared)
        out |= scores
        domains |= item_domains
    for key, item_domain in domains.items():
        for domain in sorted(set(item_domain.values())):
            out[f"{key}_{domain}"] = {k: v for k, v in out[key].items() if item_domain.get(k) == domain}
    return out


def chance_levels(dirs: Dirs, method: str) -> dict[str, float]:
    """task/metric -> chance level, from one run's metrics files (the same test items for every run)."""
    chance = {}
    for task in HEADLINES:
        path = dirs.metrics / task / f"{method}.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        if metrics.get("applicable", True):
            chance |= headline_values(metrics, task)[1]
    return chance


def score_matrices(runs: dict[str, list[tuple[Dirs, str]]]) -> dict[str, dict[str, np.ndarray]]:
    """metric -> row -> (seeds × items) on the items every seed and row was scored on; `runs`: row (a method or
    a variant) -> its (data root, method) per seed."""
    scores = {row: [per_item_scores(d, m) for d, m in seeds] for row, seeds in runs.items()}
    metrics = sorted(set.intersection(*(set(s) for runs in scores.values() for s in runs)))
    out = {}
    for metric in metrics:
        items = sorted(set.intersection(*(set(s[metric]) for runs in scores.values() for s in runs)))
        out[metric] = {m: np.array([[s[metric][i] for i in items] for s in scores[m]]) for m in runs}
    return out


# ---------------------------------------------------------------- report
ALPHA = 0.05
CORRECTION = ("Holm over the primary metrics (one per task, pipeline.tasks.registry.PRIMARY) × the baselines; "
              "Benjamini–Hochberg over every other row × baseline; p-values: a Wald test on the paired "
              "bootstrap's standard error; a difference is real when its adjusted p < 0.05")


def summarise(matrices: dict[str, dict[str, np.ndarray]], n_boot: int) -> dict:
    report = {}
    for metric, by_method in matrices.items():
        entry = {"items": int(next(iter(by_method.values())).shape[1]), "primary": metric in PRIMARY,
                 "methods": {m: stats.interval(v, n_boot=n_boot).as_dict() | {"per_seed": v.mean(1).tolist()}
                             for m, v in by_method.items()}}
        if PROPOSED in by_method:
            entry["vlap_minus"] = {}
            for base in (b for b in by_method if b != PROPOSED):  # the baselines, then VLAP's variants
                diff, p = stats.paired_test(by_method[PROPOSED], by_method[base], n_boot=n_boot)
                per_seed = by_method[PROPOSED].mean(1) - by_method[base].mean(1)  # (seeds,)
                agree = int((np.sign(per_seed) == np.sign(diff.mean)).sum()) if diff.mean else 0
                entry["vlap_minus"][base] = diff.as_dict() | {"excludes_zero": diff.excludes_zero, "p": p,
                                                              "seeds_agreeing": agree, "seeds": len(per_seed)}
        report[metric] = entry
    correct(report)
    return report


def correct(report: dict) -> None:
    """Adjust every contrast's p for multiplicity (CORRECTION) and mark the real ones, in place."""
    for family, adjust in ((True, stats.holm), (False, stats.benjamini_hochberg)):
        tests = [d for e in report.values() if e["primary"] is family for d in e.get("vlap_minus", {}).values()]
        for d, q in zip(tests, adjust([d["p"] for d in tests])):
            d["p_adjusted"], d["real"] = q, bool(q < ALPHA)


def markdown(report: dict, header: str, chance: dict[str, float] | None = None) -> str:
    methods = list(next(iter(report.values()))["methods"]) if report else []
    bases = list(dict.fromkeys(b for e in report.values() for b in e.get("vlap_minus", {})))
    lines = [header, "",
             "Each cell: mean [95% interval], bootstrap over seeds and test items (pipeline/stats.py); the "
             "intervals are uncorrected. Each difference shows its raw p and its p adjusted for multiplicity: "
             f"{CORRECTION}. Rows in bold are the primary metrics. (s/S) counts the seeds whose own "
             "difference has the same sign. `chance`: a random caption, answer, ranking or retrieved image. "
             "Taxonomy rsa and modality_gap are whole-set statistics (items 1): their intervals are over "
             "seeds only. "
             "Rows ending in _seen / _unseen: test items whose colour-shape combination training did / did not "
             "show (the zero-shot split).", "",
             "| metric | items | " + " | ".join(methods) + " | chance | " + " | ".join(f"vlap − {b}" for b in bases)
             + " |",
             "| --- | ---: |" + " ---: |" * (len(methods) + 1 + len(bases))]
    chance = chance or {}

    def fmt(i: dict, sign: bool = False) -> str:
        return f"{i['mean']:{'+' if sign else ''}.2f} [{i['low']:.2f}, {i['high']:.2f}]"

    for metric, e in report.items():
        cells = [fmt(e["methods"][m]) for m in methods] + [f"{chance[metric]:.2f}" if metric in chance else "–"]
        diffs = []
        for b in bases:
            d = e.get("vlap_minus", {}).get(b)
            diffs.append("–" if d is None else fmt(d, True) + f" p {d['p']:.2g}, adj. {d['p_adjusted']:.2g}"
                         + (" **real**" if d["real"] else " noise") + f" ({d['seeds_agreeing']}/{d['seeds']})")
        name = f"**{metric}**" if e.get("primary") else metric
        lines.append(f"| {name} | {e['items']} | " + " | ".join(cells + diffs) + " |")
    lines += ["", "Per seed (mean over items):", "", "| metric | method | " + "per-seed means |", "| --- | --- | --- |"]
    for metric, e in report.items():
        for m in methods:
            lines.append(f"| {metric} | {m} | " + ", ".join(f"{v:.2f}" for v in e["methods"][m]["per_seed"]) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, chance: dict[str, float] | None = None) -> None:
    metrics = list(report)
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = figure(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        by_method = report[metric]["methods"]
        names = list(by_method)
        means = [by_method[m]["mean"] for m in names]
        err = [[by_method[m]["mean"] - by_method[m]["low"] for m in names],
               [by_method[m]["high"] - by_method[m]["mean"] for m in names]]
        ax.bar(names, means, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        if chance and metric in chance:
            ax.axhline(chance[metric], color="k", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=6)
        ax.set_title(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def variant_overrides(cfg: Config, variant: Config) -> dict[str, object]:
    """The params a variant sets differently from the study's own: dotted key -> value."""
    def flat(section: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in section.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    base, new = flat(section_values(cfg)), flat(section_values(variant))
    return {k: v for k, v in new.items() if base.get(k) != v}


def code_revision() -> str | None:
    """The git commit the study ran from (with "+changes" when the tree had uncommitted edits), or None."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def variant_dirs(base: Dirs, root: Path, cfg: Config, variant: Config) -> Dirs:
    """A variant's data root: the prepared data and features linked; the prototypes too unless the variant
    changes how they are made (then its own, built by the prototypes stage in that root)."""
    own = section_values(variant.prototypes) != section_values(cfg.prototypes)
    dirs = base.sharing_inputs(root, ("prepared", "features") + (() if own else ("prototypes",)))
    if own:
        import stages.prototypes

        record = RunRecord(dirs.root / RUN_RECORD)
        node = next(n for n in graph() if n.spec.name == "prototypes")
        if not record.up_to_date(node, None, variant, dirs):
            run_stage(stages.prototypes, variant, dirs)
            record.record(node, None, variant, dirs)
    return dirs


def method_cell(cfg: Config, dirs: Dirs, method: str, lm) -> Dirs:
    """One cell of a study: one seed's run of `method` in its seed root."""
    train_and_evaluate(cfg, dirs, method, lm)
    return dirs


def variant_cell(base: Dirs, root: Path, cfg: Config, variant_cfg: Config, lm) -> Dirs:
    """One cell of a study: one seed's run of VLAP with a variant's params, in the variant's own root."""
    dirs = variant_dirs(base, root, cfg, variant_cfg)
    train_and_evaluate(variant_cfg, dirs, PROPOSED, lm)
    return dirs


def run_study(cfg: Config, base: Dirs, out: Path, seeds: list[int], methods: list[str], steps: int | None = None,
              test_images: int | None = None, vqa_questions: int | None = None, n_boot: int = 2000,
              command: str = "vlap study", lm=None, vqa_shots: int | None = None,
              variants: dict[str, Config] | None = None, cluster: CellCluster | None = None,
              carry: Path | None = None) -> dict:
    """Every seed trains and evaluates each method, and each of VLAP's `variants` (name -> the config VLAP
    trains with instead: another target, prior, lambda), all on the same cached inputs. Each (seed, method or
    variant) is a cell: run one after another here, or as tasks on `cluster`'s workers (vlap.cells). With
    `carry`, finished cells are restored from that folder first and each cell is copied there as it finishes
    (vlap.carry)."""
    variants = variants or {}
    require_cached_inputs(base)
    carried = CellCarry(carry, Path(out) / "runs") if carry is not None else None
    if carried is not None:
        carried.restore()
    cells: list[tuple[str, str, Callable, tuple]] = []  # (row, its method, the cell, its arguments)
    for seed in seeds:
        run_cfg = study_config(cfg, seed, steps, test_images, vqa_questions, vqa_shots)
        dirs = base.sharing_inputs(Path(out) / "runs" / f"seed-{seed}")
        cells += [(method, method, method_cell, (run_cfg, dirs, method)) for method in methods]
        for name, variant in variants.items():
            variant_cfg = study_config(variant, seed, steps, test_images, vqa_questions, vqa_shots)
            cells.append((name, PROPOSED, variant_cell, (base, Path(out) / "runs" / f"seed-{seed}" / f"variant-{name}",
                                                         cfg, variant_cfg)))

    def keep(i: int, dirs: Dirs) -> None:
        if carried is not None:
            carried.save(dirs, study_nodes(), cells[i][1])

    if cluster is None:
        if lm is None:  # one LLM for every training and evaluation of the study
            from pipeline.device import resolve_device
            from pipeline.lms import load_lm

            lm = load_lm(cfg.prototypes.llm, resolve_device(cfg.train.device))
        roots = []
        for i, (_, _, fn, args) in enumerate(cells):
            roots.append(fn(*args, lm=lm))
            keep(i, roots[-1])
    else:  # one LLM per worker, for every cell it runs
        roots = cluster.map([(fn, args) for _, _, fn, args in cells], cfg.prototypes.llm, cfg.train.device,
                            on_done=keep)
    runs: dict[str, list[tuple[Dirs, str]]] = {row: [] for row in [*methods, *variants]}
    for (row, method, _, _), dirs in zip(cells, roots):
        runs[row].append((dirs, method))
    roots = [d for d, _ in runs[methods[0]]]
    report = summarise(score_matrices(runs), n_boot)
    run_cfg = study_config(cfg, seeds[0], steps, test_images, vqa_questions, vqa_shots)
    header = (f"# Study: {len(seeds)} seeds × {len(methods)} methods, {run_cfg.train.steps} steps of batch "
              f"{run_cfg.train.batch_size}\n\nCommand: `{command}`  \n"
              f"Seeds {seeds}; test images {run_cfg.evaluate.common.test_images or 'all'}; VQA questions "
              f"{run_cfg.evaluate.vqa.questions or 'all'} (shots: {run_cfg.evaluate.vqa.shots}); "
              f"lr {', '.join(f'{m} {method_lr(run_cfg, m):g}' for m in methods)}, "
              f"precision {run_cfg.train.precision}, schedule {run_cfg.train.schedule}; "
              + "".join(f"variant {name}: vlap with {', '.join(f'{k}={v}' for k, v in variant_overrides(cfg, v).items())}; "
                        for name, v in variants.items()) +
              f"encoder {cfg.extract.encoder}, LLM {cfg.prototypes.llm}.")
    out = Path(out)
    write_json_atomic(out / "study.json", {"command": command, "seeds": seeds, "methods": methods,
                                           "variants": {name: variant_overrides(cfg, v) for name, v in variants.items()},
                                           "correction": CORRECTION, "primary": list(PRIMARY),
                                           "setting": study_setting(run_cfg), "code_revision": code_revision(),
                                           "train": section_values(run_cfg.train), "metrics": report})
    chance = chance_levels(roots[0], methods[0])
    write_markdown(out / "report.md", markdown(report, header, chance))
    plot(report, out / "intervals.png", chance)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlap study", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", default="data", type=Path, help="the pipeline's data root (its cached inputs are reused)")
    p.add_argument("--out", default=None, type=Path, help="study folder (default: <data>/study)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: params)")
    p.add_argument("--test-images", type=int, default=None, help="evaluated test images, 0 = all (default: params)")
    p.add_argument("--vqa-questions", type=int, default=None, help="VQA questions, 0 = all (default: params)")
    p.add_argument("--vqa-shots", type=int, default=None, help="n of the n-shot VQA setting, 0 = 0-shot only "
                   "(default: params)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="a params value for every run of the study, e.g. train.batch_size=32 (repeatable)")
    p.add_argument("--tuned", type=Path, default=None, metavar="TUNE_JSON",
                   help="each method's settings as this `vlap tune` chose them (its tune.json), checked against the "
                        "study's training budget; --set after it still wins")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="one more row: VLAP with these params, e.g. released:methods.vlap.target=released,"
                        "prototypes.prior=released (repeatable)")
    p.add_argument("--carry", type=Path, default=None, metavar="DIR",
                   help="a folder to move finished cells between machines (commit it): cells in it are restored "
                        "first, and each finished cell is copied into it (a few MB each)")
    add_placement_options(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = recorded_command("vlap study", argv)  # the same study whichever workers ran it

    def go() -> None:
        sets = args.sets
        if args.tuned is not None:  # the tune's choices first: an explicit --set overrides one of them
            budget = study_config(load_config_with(args.params, sets), args.seeds[0], args.steps, None, None, None)
            sets = tuned_settings(args.tuned, dataclasses.asdict(budget.train)) + sets
        cfg = load_config_with(args.params, sets)
        variants = {}
        for text in args.variant:
            name, sep, assignments = text.partition(":")
            if not sep or not name or not assignments:
                raise ConfigError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
            variants[name] = load_config_with(args.params, sets + assignments.split(","))
        cluster = cluster_for(args.workers, args.scheduler, cfg.extract, args.threads)
        try:
            run_study(cfg, Dirs.under(args.data), args.out or args.data / "study", args.seeds, args.methods,
                      args.steps, args.test_images, args.vqa_questions, args.boot, command, vqa_shots=args.vqa_shots,
                      variants=variants, cluster=cluster, carry=args.carry)
        finally:
            if cluster is not None:
                cluster.close()

    return report_user_errors(go)


if __name__ == "__main__":
    sys.exit(main())
