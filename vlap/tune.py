"""`vlap tune`: every method at its best, with the same budget, chosen on the validation split.

    vlap tune [--methods vlap limber contrastive] [--lr 3e-3 1e-2] [--weight 0.1 1.0] [--temperature 0.07 0.01]
              [--val-images 200] [--extend-edges N] [--apply] [--out data/tune]
              [--workers N | --scheduler ADDRESS] [--threads T]

Every method gets the same grid: the learning rate, times its alignment weight (λ =
`methods.vlap.ap_weight`, `methods.contrastive.nce_weight`; limber has none; `--temperature` also varies the initial
temperature of contrastive's learnable logit scale), at the training budget
params.yaml gives (steps, batch, precision, seed). Each setting trains on the train split and is
scored on the validation split (`prepare.validation_fraction`, carved out of train; never the test
split): greedy captions (METEOR, CIDEr) and retrieval (R@1 both ways under every inductive scorer).
The validation score is the mean of METEOR × 100 and the mean R@1 of the method's best scorer, so a
method is tuned for both what it shares with the others (captioning) and what it aligns for
(retrieval). Writes `<out>/report.md` and `tune.json`; `--apply` writes each method's chosen settings
into params.yaml (`methods.<m>.lr` and its weight), where `dvc repro`, the study and the ablation read
them. Runs share the pipeline's cached features and prototypes (`dvc repro extract prototypes` first); a
re-run keeps every setting it finished (`tune.json` keeps the runs of another grid or budget under "kept":
they never compete). `--extend-edges N`: a method whose best lr is the grid's lowest or highest is tried
one grid step past it, with every weight it was tried at; one whose best alignment weight is the lowest or
highest is tried one weight step past it, at its best lr; up to N rounds, so no method is read at the edge of
its grid.
With `--workers N` / `--scheduler ADDRESS` the settings are Dask tasks, each worker on its own GPU or share
of the cores with its own LLM (vlap/cells.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from pipeline.manifest import manifest_splits, read_manifest
from pipeline.features import features_file
from pipeline.config import METHODS, Config
from pipeline.distributed import without_launch
from pipeline.methods import NAMES, method_class
from pipeline.errors import ConfigError, report_user_errors
from pipeline.io import write_json_atomic
from pipeline.report import write_markdown
from vlap.cells import CellCluster, add_placement_options, cluster_for
from vlap.inputs import require_cached_inputs
from vlap.params_file import load_config_with, update_params
from pipeline.paths import Dirs
from pipeline.tasks.captioning import evaluate_captioning
from pipeline.tasks.inputs import load_eval_inputs
from pipeline.tasks.retrieval import SCORERS, evaluate_retrieval, fit_on_training
from stages import train
from stages.common import run_stage

log = logging.getLogger("vlap.tune")
WEIGHT_KEY = {name: method_class(name).weight_key for name in NAMES
              if method_class(name).weight_key}  # each method's alignment weight


@dataclasses.dataclass(frozen=True)
class Setting:
    method: str
    lr: float
    weight: float | None  # None: the method has no alignment weight
    temperature: float | None = None  # contrastive: the initial temperature of its learnable logit scale

    @property
    def name(self) -> str:
        return (f"lr{self.lr:g}" + ("" if self.weight is None else f"-w{self.weight:g}")
                + ("" if self.temperature is None else f"-t{self.temperature:g}"))

    def config(self, cfg: Config) -> Config:
        changes = ({"lr": self.lr} | ({} if self.weight is None else {WEIGHT_KEY[self.method]: self.weight})
                   | ({} if self.temperature is None else {method_class(self.method).temperature_key: self.temperature}))
        method_cfg = dataclasses.replace(getattr(cfg.methods, self.method), **changes)
        return dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, **{self.method: method_cfg}))


def grid(methods: list[str], lrs: list[float], weights: list[float], temperatures: list[float] | None = None
         ) -> list[Setting]:
    """lr x alignment weight for every method; contrastive also x the initial temperature of its logit scale
    (CLIP's 1/0.07 moves little in a short run, and the captions' z_t are nearly parallel)."""
    return [Setting(m, lr, w, t) for m in methods for lr in lrs for w in ([None] if m not in WEIGHT_KEY else weights)
            for t in (temperatures or [None] if method_class(m).temperature_key else [None])]


def validation_score(scores: dict) -> float:
    """½ (METEOR × 100 + the mean of both directions' R@1 under the method's best scorer)."""
    recall = max((scores[f"{s}_i2t_R@1"] + scores[f"{s}_t2i_R@1"]) / 2 for s in SCORERS if f"{s}_i2t_R@1" in scores)
    return 0.5 * (100.0 * scores["METEOR"] + recall)


def evaluate_on_validation(cfg: Config, dirs: Dirs, method: str, lm, val_images: int) -> dict:
    eval_cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(
        cfg.evaluate, common=dataclasses.replace(cfg.evaluate.common, test_images=val_images)))
    inputs = load_eval_inputs(eval_cfg, method, dirs, lm=lm, split="val")
    caption, _ = evaluate_captioning(inputs, eval_cfg)
    fit = fit_on_training(inputs, features_file(dirs.features, "train"), read_manifest(dirs.prepared, "train"),
                          eval_cfg.evaluate.retrieval, eval_cfg.evaluate.common.batch_size)
    retrieval, _, _ = evaluate_retrieval(inputs, eval_cfg, fit)
    bridge_meta = json.loads((dirs.models / method / "config.json").read_text())
    final = {k: v for k, v in bridge_meta["final"].items() if k.startswith(("loss", "logit_scale"))}
    scores = {k: caption[k] for k in ("CIDEr", "METEOR", "BLEU-1")} | {
        f"{s}_{d}_R@1": retrieval[f"{s}_{d}_R@1"] for s in SCORERS for d in ("i2t", "t2i")}
    return scores | {"final": final, "score": validation_score(scores)}


def tune_cell(setting: Setting, cfg: Config, dirs: Dirs, val_images: int, lm) -> dict:
    """One cell of the grid: train the setting's bridge, then score it on the validation split."""
    run_stage(train, cfg, dirs, setting.method, lm=lm)
    return evaluate_on_validation(cfg, dirs, setting.method, lm, val_images)


def beyond_edge(best: float, values: list[float]) -> float | None:
    """One grid step past the edge of `values` (sorted, at least two: lrs or weights) where `best` sits, at the
    ratio of the two values at that edge (1e-3, 3e-3 -> 9e-3 above, 3.33e-4 below); None when the best is
    inside, or when there is one value only."""
    if len(values) < 2:
        return None
    if best == values[-1]:
        return float(f"{values[-1] * values[-1] / values[-2]:.3g}")
    if best == values[0]:
        return float(f"{values[0] * values[0] / values[1]:.3g}")
    return None


def run_tune(cfg: Config, base: Dirs, out: Path, methods: list[str], lrs: list[float], weights: list[float],
             val_images: int, lm=None, temperatures: list[float] | None = None,
             cluster: CellCluster | None = None, extend_edges: int = 0) -> dict:
    """Every setting of the grid trained and scored, one after another here or as tasks on `cluster`'s
    workers (vlap.cells); a setting finished before with the same fingerprint is kept. With `extend_edges`,
    a method whose best lr is at an edge of its grid gets one more lr past that edge (with every weight),
    up to that many times, and a method whose best weight is at an edge of the weights gets one more weight past
    it (at its best lr): the same rule for every method, so none is read at the edge of what it was given."""
    require_cached_inputs(base)
    if "val" not in manifest_splits(base.prepared):
        raise ConfigError("params.yaml: prepare.validation_fraction: 0 leaves no validation split to tune on")
    if extend_edges and len(set(lrs)) < 2 and len(set(weights)) < 2:
        raise ConfigError("--extend-edges needs at least two learning rates or two weights (the step past an edge "
                          "is the ratio of the two values there)")
    results_path = Path(out) / "tune.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    done = saved.get("runs", {}) | saved.get("kept", {})  # kept: runs of another grid or budget, for a later tune
    fingerprints = {}  # key -> the fingerprint of this tune's setting

    def run_settings(settings: list[Setting]) -> None:
        nonlocal done, lm
        todo = []  # (key, setting, fingerprint, the cell's arguments)
        for setting in settings:
            key = f"{setting.method}/{setting.name}"
            run_cfg = setting.config(cfg)
            fingerprint = {"train": without_launch(dataclasses.asdict(run_cfg.train)),  # any process count alike
                           "method": dataclasses.asdict(getattr(run_cfg.methods, setting.method)),
                           "val_images": val_images}
            fingerprints[key] = fingerprint
            if done.get(key, {}).get("fingerprint") == fingerprint:
                log.info("tune: %s done before, kept", key)
                continue
            dirs = base.sharing_inputs(Path(out) / "runs" / setting.method / setting.name)
            todo.append((key, setting, fingerprint, (setting, run_cfg, dirs, val_images)))

        def finished(i: int, scores: dict) -> None:
            key, setting, fingerprint, _ = todo[i]
            done[key] = {"method": setting.method, "lr": setting.lr, "weight": setting.weight,
                         "temperature": setting.temperature, "fingerprint": fingerprint} | scores
            write_json_atomic(results_path, {"runs": done})  # after every setting: an interrupted tune resumes
            log.info("tune: %s validation score %.2f", key, done[key]["score"])

        if cluster is None:
            if lm is None and todo:
                from pipeline.device import resolve_device
                from pipeline.lms import load_lm

                lm = load_lm(cfg.prototypes.llm, resolve_device(cfg.train.device))
            for i, (_, _, _, args) in enumerate(todo):
                finished(i, tune_cell(*args, lm=lm))
        elif todo:  # one LLM per worker, for every setting it runs
            order = list(dict.fromkeys([*done, *(key for key, *_ in todo)]))  # as a serial run adds them (ties in max)
            cluster.map([(tune_cell, args) for *_, args in todo], cfg.prototypes.llm, cfg.train.device, finished)
            done = {key: done[key] for key in order}

    def best(method: str) -> dict:
        """The method's best run of this tune's grid (runs kept from another grid or budget do not compete)."""
        return max((done[k] for k in fingerprints if k.startswith(f"{method}/")
                    and done[k]["fingerprint"] == fingerprints[k]), key=lambda r: r["score"])

    lr_grid = {m: sorted(set(lrs)) for m in methods}
    weight_grid = {m: sorted(set(weights)) for m in methods if m in WEIGHT_KEY}
    run_settings(grid(methods, lrs, weights, temperatures))
    for _ in range(extend_edges):
        top = {m: best(m) for m in methods}
        past_lr = {m: lr for m in methods if (lr := beyond_edge(top[m]["lr"], lr_grid[m])) is not None}
        past_weight = {m: w for m, ws in weight_grid.items() if (w := beyond_edge(top[m]["weight"], ws)) is not None}
        if not past_lr and not past_weight:
            break
        settings = []
        for m, lr in past_lr.items():  # with the weights tried before this round
            log.info("tune: %s is best at the edge of lr %s: trying lr %g", m, lr_grid[m], lr)
            settings += grid([m], [lr], weight_grid.get(m, weights), temperatures)
            lr_grid[m] = sorted(lr_grid[m] + [lr])
        for m, w in past_weight.items():
            log.info("tune: %s is best at the edge of weight %s: trying weight %g at lr %g", m, weight_grid[m], w,
                     top[m]["lr"])
            settings += grid([m], [top[m]["lr"]], [w], temperatures)
            weight_grid[m] = sorted(weight_grid[m] + [w])
        run_settings(settings)
    chosen = {m: best(m) for m in methods}
    runs = {k: done[k] for k in done if k in fingerprints}
    report = {"runs": runs, "chosen": {m: {"lr": r["lr"], "weight": r["weight"], "temperature": r.get("temperature"),
                                           "score": r["score"]} for m, r in chosen.items()},
              "grid": {"lr": lrs, "weight": weights, "temperature": temperatures, "extend_edges": extend_edges,
                       "lr_by_method": lr_grid, "weight_by_method": weight_grid},
              "val_images": val_images}
    write_json_atomic(results_path, report | {"kept": {k: r for k, r in done.items() if k not in runs}})
    write_markdown(Path(out) / "report.md", markdown(report, cfg))
    return report


def markdown(report: dict, cfg: Config) -> str:
    t = cfg.train
    cols = ["CIDEr", "METEOR"] + [f"{s}_{d}_R@1" for s in SCORERS for d in ("i2t", "t2i")]
    lines = [f"# Tuning on the validation split ({report['val_images'] or 'all'} images)", "",
             f"Grid: lr {report['grid']['lr']} × alignment weight {report['grid']['weight']} (λ for vlap, "
             f"nce_weight for contrastive; limber has none); {t.steps} steps of batch {t.batch_size}, {t.precision}, "
             f"seed {t.seed}. Score: ½ (METEOR × 100 + mean R@1 of the best scorer). **Bold**: chosen.", "",
             *extended_grid_lines(report["grid"]),
             "| method | lr | weight | score | " + " | ".join(cols) + " | final losses |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(cols) + " --- |"]
    for key, r in sorted(report["runs"].items()):
        c = report["chosen"][r["method"]]
        bold = "**" if (r["lr"], r["weight"], r.get("temperature")) == (c["lr"], c["weight"], c["temperature"]) else ""
        final = ", ".join(f"{k} {v:.3f}" for k, v in r["final"].items())
        weight = "–" if r["weight"] is None else f"{r['weight']:g}"
        if r.get("temperature") is not None:
            weight += f", T0 {r['temperature']:g}"
        lines.append(f"| {bold}{r['method']}{bold} | {r['lr']:g} | {weight} | "
                     f"{r['score']:.2f} | " + " | ".join(f"{r[k]:.3f}" if k in ("CIDEr", "METEOR") else f"{r[k]:.1f}"
                                                    for k in cols) + f" | {final} |")
    return "\n".join(lines) + "\n"


def extended_grid_lines(grid_record: dict) -> list[str]:
    """The lrs and weights each method was tried at, where the grid was extended past its edges
    (`--extend-edges`)."""
    lines = []
    for axis in ("lr", "weight"):
        extended = {m: values for m, values in grid_record.get(f"{axis}_by_method", {}).items()
                    if len(values) > len(set(grid_record[axis]))}
        if extended:
            tried = "; ".join(f"{m}: {', '.join(f'{v:g}' for v in values)}" for m, values in extended.items())
            lines += [f"Extended past the edge where a method's best {axis} sat (up to {grid_record['extend_edges']} "
                      f"round(s), the same rule for every method): {tried}.", ""]
    return lines


def chosen_values(report: dict) -> dict[str, object]:
    """Each method's chosen settings as params keys: `methods.<m>.lr`, its weight, its initial temperature."""
    values = {}
    for method, c in report["chosen"].items():
        values[f"methods.{method}.lr"] = c["lr"]
        if c["weight"] is not None:
            values[f"methods.{method}.{WEIGHT_KEY[method]}"] = c["weight"]
        if c.get("temperature") is not None:
            values[f"methods.{method}.{method_class(method).temperature_key}"] = c["temperature"]
    return values


def apply_to_params(report: dict, params: Path) -> None:
    """Write each chosen lr and weight into params.yaml, keeping its comments."""
    update_params(params, chosen_values(report))


# What a tuned setting is tied to: a learning rate chosen at one length, batch or precision is no choice at another
BUDGET_KEYS = ("max_samples", "steps", "epochs", "batch_size", "weight_decay", "warmup_steps", "warmup_epochs",
               "schedule", "prompt", "max_caption_tokens", "precision")


def tuned_settings(path: Path, train: dict) -> list[str]:
    """`key=value` settings of the methods a tune (its tune.json) chose, for runs whose train section is `train`
    (the study's); a ConfigError in one line where the tune trained at another budget."""
    try:
        report = json.loads(Path(path).read_text())
        chosen = report["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--tuned {path}: not a tune.json that `vlap tune` finished ({type(e).__name__}: {e})")
    for method, c in chosen.items():
        run = next((r for r in report["runs"].values() if r["method"] == method and r["lr"] == c["lr"]
                    and r["weight"] == c["weight"] and r.get("temperature") == c.get("temperature")), None)
        tuned = {} if run is None else run["fingerprint"]["train"]
        differ = [f"train.{k} {tuned.get(k)!r} there, {train[k]!r} here" for k in BUDGET_KEYS
                  if tuned.get(k) != train[k]]
        if differ:
            raise ConfigError(f"--tuned {path}: {method} was tuned at another budget ({'; '.join(differ)}): "
                              f"tune at this one (vlap tune --set ...) or pass its settings with --set")
    return [f"{key}={value}" for key, value in chosen_values(report).items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlap tune", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", type=Path)
    p.add_argument("--data", default="data", type=Path, help="the pipeline's data root (its cached inputs are reused)")
    p.add_argument("--out", default=None, type=Path, help="tuning folder (default: <data>/tune)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--weight", type=float, nargs="+", default=[0.1, 1.0], help="alignment weights (λ, nce_weight)")
    p.add_argument("--temperature", type=float, nargs="+", default=None,
                   help="contrastive: initial temperatures of its learnable logit scale (default: params.yaml's)")
    p.add_argument("--val-images", type=int, default=200, help="validation images scored, 0 = all")
    p.add_argument("--extend-edges", type=int, default=0, metavar="N",
                   help="a method best at the lowest or highest lr (or weight) gets one more past it, up to N rounds")
    p.add_argument("--apply", action="store_true", help="write the chosen settings into --params")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="a params value for every setting tried, e.g. train.steps=1000 (a budget other than params')")
    add_placement_options(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def go() -> None:
        if args.apply and args.sets:
            raise ConfigError("--apply with --set would write into params.yaml values tuned at another setting; "
                              "pass the chosen values on (e.g. vlap study --set methods.vlap.lr=...)")
        cfg = load_config_with(args.params, args.sets)
        cluster = cluster_for(args.workers, args.scheduler, cfg.extract, args.threads)
        try:
            report = run_tune(cfg, Dirs.under(args.data), args.out or args.data / "tune", args.methods, args.lr,
                              args.weight, args.val_images, temperatures=args.temperature, cluster=cluster,
                              extend_edges=args.extend_edges)
        finally:
            if cluster is not None:
                cluster.close()
        for method, c in report["chosen"].items():
            print(f"{method}: lr {c['lr']:g}" + ("" if c["weight"] is None else f", {WEIGHT_KEY[method]} {c['weight']:g}")
                  + f" (validation score {c['score']:.2f})")
        if args.apply:
            apply_to_params(report, args.params)
            print(f"written to {args.params}")

    return report_user_errors(go)


if __name__ == "__main__":
    sys.exit(main())
