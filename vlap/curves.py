"""`vlap curves`: each method trained at a constant learning rate until its validation captioning loss plateaus.

    vlap curves [--methods vlap limber contrastive] [--max-steps 3000] [--batch-size 32] [--lr 1e-3]
                [--precision bf16] [--every 40] [--val-samples 256] [--window 0.2] [--tolerance 0.01]
                [--min-steps 340] [--out results/curves-easyvqa]

Why constant: under the pipeline's cosine schedule every curve flattens at its end because the learning
rate reaches 0, whatever the budget. Here the rate is flat after the warm-up, so a flat curve means the
method stopped improving. Every `--every` steps the train stage's validation (pipeline/validation.py) logs
the val split's losses and R@1; the run stops at the first point where the plateau criterion holds
(pipeline/plateau.py: less than `--tolerance` relative improvement of val/loss_cap over the last `--window`
of the steps, from `--min-steps` on), or at `--max-steps` with its remaining slope reported.

Every method runs with the same batch, learning rate, schedule and validation subset, on the pipeline's
cached features and prototypes (linked, never re-made; `dvc repro extract prototypes` first), one seed. Each run
lives in `<data>/curves/<method>/` and checkpoints at every point: a killed or stopped `vlap curves`
resumes each method from its last point, and a method already at its plateau is not trained again. The
bridge at the plateau (or the last step) is written to `<data>/curves/<method>/models/<method>/`, a data
root the `vlap` command reads: `vlap search "a blue circle" --method vlap --data data/curves/vlap`.
Writes `<out>/curves.json` (each point of every val/ metric and the mean train loss between points,
the verdict, the settings), `<out>/curves.png` and `<out>/report.md`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from pipeline.config import METHODS, Config, load_config, section_values
from pipeline.errors import report_user_errors
from pipeline.io import write_json_atomic
from pipeline.paths import Dirs
from pipeline.plateau import Plateau, plateau
from pipeline.report import figure, save_figure, write_markdown
from vlap.inputs import require_cached_inputs

log = logging.getLogger("vlap.curves")
LOSS = "loss_cap"  # the val/ metric the plateau is read on


@dataclasses.dataclass(frozen=True)
class Criterion:
    window: float = 0.2
    tolerance: float = 0.01
    min_steps: int = 340

    def verdict(self, points: list[tuple[int, float]]) -> Plateau | None:
        return plateau(points, self.window, self.tolerance, self.min_steps)


def curve_config(cfg: Config, method: str, max_steps: int, batch_size: int, lr: float, precision: str, every: int,
                 val_samples: int, warmup_steps: int) -> Config:
    """The run's config: constant schedule, validation and a checkpoint at every point, one lr for all."""
    validation = dataclasses.replace(cfg.train.validation, every=every, samples=val_samples)
    train = dataclasses.replace(cfg.train, steps=max_steps, epochs=0.0, batch_size=batch_size, schedule="constant",
                                warmup_steps=warmup_steps, precision=precision, checkpoint_every=every,
                                validation=validation)
    methods = dataclasses.replace(cfg.methods, **{method: dataclasses.replace(getattr(cfg.methods, method), lr=lr)})
    return dataclasses.replace(cfg, train=train, methods=methods)


def val_points(history: list[dict], name: str = LOSS) -> list[tuple[int, float]]:
    """(steps done, val/<name>) at every validation point of a training history."""
    return [(i + 1, row["val"][name]) for i, row in enumerate(history) if "val" in row]


def read_curves(live_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """"<split>/<metric>" -> [(steps done, value)] from a run's dvclive plot files."""
    out = {}
    for tsv in sorted((live_dir / "plots" / "metrics").glob("*/*.tsv")):
        with tsv.open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))[1:]
        out[f"{tsv.parent.name}/{tsv.stem}"] = [(int(s) + 1, float(v)) for s, v in rows]
    return out


def train_means(points: list[tuple[int, float]], at: list[int]) -> list[tuple[int, float]]:
    """The mean training value over the steps since the previous validation point, at each of `at`."""
    out, prev = [], 0
    steps = np.array([s for s, _ in points])
    values = np.array([v for _, v in points])
    for s in at:
        sel = (steps > prev) & (steps <= s)
        if sel.any():
            out.append((s, float(values[sel].mean())))
        prev = s
    return out


def run_method(cfg: Config, base: Dirs, work: Path, method: str, criterion: Criterion, lm) -> None:
    """Train `method` until its plateau or the last step, resuming from its last point."""
    import stages.train
    from pipeline.train import checkpoint_file, read_checkpoint

    dirs = base.sharing_inputs(work / method)
    checkpoint = checkpoint_file(dirs.models, method)
    if checkpoint.exists():
        verdict = criterion.verdict(val_points(read_checkpoint(checkpoint, lm.device)["history"]))
        if verdict and verdict.reached and (dirs.models / method / "model.safetensors").exists():
            log.info("curves %s: at its plateau since step %d; kept", method, verdict.step)
            return
    elif (dirs.models / method / "model.safetensors").exists():
        log.info("curves %s: ran to its last step before; kept", method)
        return
    stages.train.run(cfg, dirs, method, lm=lm, until=lambda history: bool(
        (v := criterion.verdict(val_points(history))) and v.reached))


def method_record(work: Path, method: str, criterion: Criterion, max_steps: int) -> dict:
    curves = read_curves(Dirs.under(work / method).metrics / "train" / method)
    val = curves.get(f"val/{LOSS}", [])
    verdict = criterion.verdict(val)
    at = [s for s, _ in val]
    status = ("plateau" if verdict and verdict.reached else
              "last step, no plateau" if at and at[-1] >= max_steps else "running")
    return {"status": status, "verdict": verdict.as_dict() if verdict else None,
            "val": {k.split("/", 1)[1]: v for k, v in curves.items() if k.startswith("val/")},
            "train_interval_means": {k.split("/", 1)[1]: train_means(v, at) for k, v in curves.items()
                                     if k.startswith("train/") and k != "train/lr"}}


def report(records: dict[str, dict], settings: dict, criterion: Criterion, command: str, out: Path) -> None:
    write_json_atomic(out / "curves.json", {"command": command, "settings": settings,
                                            "criterion": dataclasses.asdict(criterion), "methods": records})
    per_epoch = settings["steps_per_epoch"]
    lines = [f"# Learning curves to a plateau ({settings['dataset']}, {settings['encoder']} + {settings['llm']})", "",
             f"Command: `{command}`  ",
             f"Batch {settings['batch_size']}, lr {settings['lr']:g} for every method (AdamW, weight decay "
             f"{settings['weight_decay']:g}, {settings['warmup_steps']} warm-up steps, then constant), precision "
             f"{settings['precision']}, seed {settings['seed']}; {per_epoch} steps per epoch of "
             f"{settings['samples']} training pairs. Validation every {settings['every']} steps on the first "
             f"{settings['val_samples']} val images.", "",
             f"Plateau: val/{LOSS} improved by less than {criterion.tolerance:.0%} over the last "
             f"{criterion.window:.0%} of the steps (from step {criterion.min_steps} on; pipeline/plateau.py).", "",
             "| method | status | steps (epochs) | val loss_cap | lowest val loss_cap (step) | improvement over the last "
             "window | slope per 1k steps | val R@1 (cosine / assignment / centred) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for method, r in records.items():
        v = r["verdict"]
        r1 = " / ".join(f"{r['val'][f'{s}_i2t_R@1'][-1][1]:.1f}" if r["val"].get(f"{s}_i2t_R@1") else "–"
                        for s in ("cosine", "assignment", "centred"))
        if v is None:
            lines.append(f"| {method} | {r['status']} | – | – | – | – | – | {r1} |")
            continue
        best_step, best = min(r["val"][LOSS], key=lambda point: point[1])
        lines.append(f"| {method} | {r['status']} | {v['step']} ({v['step'] / per_epoch:.1f}) | {v['loss']:.4f} | "
                     f"{best:.4f} ({best_step}) | "
                     f"{100 * v['improvement']:.2f}% (from step {v['reference_step']}) | {v['slope_per_1k']:+.4f} | "
                     f"{r1} |")
    lines += ["", "![curves](curves.png)", ""]
    write_markdown(out / "report.md", "\n".join(lines))
    plot(records, out / "curves.png", per_epoch)


def plot(records: dict[str, dict], path: Path, per_epoch: int) -> None:
    panels = [LOSS, "loss_ap", "loss_nce", "cosine_i2t_R@1", "assignment_i2t_R@1", "centred_i2t_R@1"]
    fig, axes = figure(2, 3, figsize=(13, 7), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for i, (method, r) in enumerate(records.items()):
            pts = r["val"].get(name, [])
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=f"C{i}", label=f"{method} val")
            train = r["train_interval_means"].get(name, [])
            if train:
                ax.plot([s for s, _ in train], [v for _, v in train], color=f"C{i}", linestyle=":",
                        label=f"{method} train")
            v = r["verdict"]
            if v and v["reached"] and name == LOSS:
                ax.axvline(v["step"], color=f"C{i}", linewidth=0.8, linestyle="--")
        if name == LOSS:
            ax.set_yscale("log")  # the first points are 30x the last: on a linear axis the end looks flat
        ax.set_title(f"{name} ({'val and train' if name.startswith('loss_cap') else 'val'})", fontsize=9)
        ax.set_xlabel(f"step ({per_epoch} per epoch)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run_curves(cfg: Config, base: Dirs, out: Path, methods: list[str], max_steps: int, batch_size: int, lr: float,
               precision: str, every: int, val_samples: int, warmup_steps: int, criterion: Criterion,
               command: str, work: Path | None = None, lm=None, train: bool = True) -> dict:
    require_cached_inputs(base)
    from pipeline.train import load_train_data

    work = work or base.root / "curves"
    if lm is None and train:
        from pipeline.device import resolve_device
        from pipeline.lms import load_lm

        lm = load_lm(cfg.prototypes.llm, resolve_device(cfg.train.device))
    runs = {m: curve_config(cfg, m, max_steps, batch_size, lr, precision, every, val_samples, warmup_steps)
            for m in methods}
    for method in methods if train else []:
        run_method(runs[method], base, work, method, criterion, lm)
    samples = len(load_train_data(cfg, base).rows)
    t = runs[methods[0]].train
    settings = {"dataset": cfg.prepare.source, "encoder": cfg.extract.encoder, "llm": cfg.prototypes.llm,
                "samples": samples, "steps_per_epoch": max(1, samples // batch_size), "max_steps": max_steps,
                "lr": lr, "every": every, "val_samples": val_samples} | {
        k: v for k, v in section_values(t).items() if k in ("batch_size", "weight_decay", "warmup_steps",
                                                            "precision", "seed", "schedule", "prompt")}
    records = {m: method_record(work, m, criterion, max_steps) for m in methods}
    out.mkdir(parents=True, exist_ok=True)
    report(records, settings, criterion, command, out)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlap curves", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", default="data", type=Path, help="the pipeline's data root (its cached inputs are reused)")
    p.add_argument("--out", default=None, type=Path, help="report folder (default: <data>/curves)")
    p.add_argument("--work", default=None, type=Path, help="the runs' folder (default: <data>/curves)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="every method's learning rate")
    p.add_argument("--precision", default="bf16", choices=("auto", "fp32", "bf16"))
    p.add_argument("--every", type=int, default=40, help="steps between validation points (and checkpoints)")
    p.add_argument("--val-samples", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--window", type=float, default=Criterion.window)
    p.add_argument("--tolerance", type=float, default=Criterion.tolerance)
    p.add_argument("--min-steps", type=int, default=Criterion.min_steps)
    p.add_argument("--report-only", action="store_true", help="write the report from the runs as they stand "
                   "(one method per process: train each with --methods M, then report all)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = " ".join(["vlap curves", *argv])
    return report_user_errors(lambda: run_curves(
        load_config(args.params), Dirs.under(args.data), args.out or args.data / "curves", args.methods,
        args.max_steps, args.batch_size, args.lr, args.precision, args.every, args.val_samples, args.warmup_steps,
        Criterion(args.window, args.tolerance, args.min_steps), command, work=args.work, train=not args.report_only))


if __name__ == "__main__":
    sys.exit(main())
