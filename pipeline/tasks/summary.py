"""One table of every method x every task's headline metrics, with chance levels, and a bar plot.

Retrieval rows compare every method under one scorer at a time (cosine, assignment, centred). Where
the test images have domains (the zero-shot split's seen / unseen, NoCaps' in / near / out), each
headline metric that has a per-domain value gets one row per domain. With a committed study
(results/), each row says which of its VLAP-vs-baseline differences the study found real.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.report import figure, save_figure
from pipeline.tasks.registry import HEADLINES, TASKS

DOMAINS = ("seen", "unseen", "in", "near", "out")  # per-domain suffixes a metrics file may carry


def headline_values(metrics: dict, task: str) -> tuple[dict[str, float | None], dict[str, float]]:
    """(the task's headline metrics and their per-domain values, the chance level of each); 'nshot'
    resolves to the n-shot setting present in the file."""
    nshot = next((k.split("_")[0] for k in metrics if k.endswith("shot_open_accuracy") and not k.startswith("0shot")),
                 None)
    out, chance = {}, {}
    for key in HEADLINES[task]:
        real = key.replace("nshot", nshot) if key.startswith("nshot") and nshot else key
        out[f"{task}/{real}"] = metrics.get(real)
        level = TASKS[task].chance_key(real)
        if level in metrics:
            chance[f"{task}/{real}"] = metrics[level]
        for domain in DOMAINS:
            # captioning's per-domain CIDEr is CIDEr_<domain>; every other metric is <metric>_<domain>
            if f"{real}_{domain}" in metrics:
                out[f"{task}/{real}_{domain}"] = metrics[f"{real}_{domain}"]
    return out, chance


NOT_APPLICABLE = "n/a"


def collect(metrics_dir: Path, methods: list[str]
            ) -> tuple[dict[str, dict[str, float | str | None]], dict[str, str], dict[str, float]]:
    """(method -> {task/metric: value or "n/a"}, task -> why it is not applicable, task/metric -> chance).

    A missing file gives no entries for that task; a task the data lacks inputs for gives one
    "n/a" cell per method and its reason."""
    table, reasons, chance = {}, {}, {}
    for method in methods:
        row = {}
        for task in HEADLINES:
            path = Path(metrics_dir) / task / f"{method}.json"
            if not path.exists():
                continue
            metrics = json.loads(path.read_text())
            if metrics.get("applicable", True):
                values, levels = headline_values(metrics, task)
                row |= values
                chance |= levels
            else:
                row[task] = NOT_APPLICABLE
                reasons[task] = metrics.get("reason", "")
        table[method] = row
    return table, reasons, chance


def study_setting(cfg) -> dict:
    """What a study's verdicts belong to: the data, the models and the training budget. A summary shows a
    study's verdicts only beside a run of the same setting."""
    return {"source": cfg.prepare.source, "test_source": cfg.prepare.test_source,
            "heldout": list(cfg.prepare.heldout), "encoder": cfg.extract.encoder, "llm": cfg.prototypes.llm,
            "steps": cfg.train.steps, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size}


def study_mismatch(study_json: Path, setting: dict) -> str | None:
    """Why the study at `study_json` is not this run's (None when it is, or when there is no study)."""
    if not Path(study_json).exists():
        return None
    study = json.loads(Path(study_json).read_text())
    recorded = study.get("setting")
    if recorded is None:
        return "it records no setting (data, models, budget)"
    differs = [f"{k} {recorded.get(k)!r} (this run: {v!r})" for k, v in setting.items() if recorded.get(k) != v]
    if differs:
        return f"it was made with {'; '.join(differs)}"
    if "correction" not in study:
        return "its verdicts are not corrected for multiplicity (re-run `vlap study`)"
    return None


def study_verdicts(study_json: Path) -> dict[str, str]:
    """task/metric -> the committed study's real differences after its multiplicity correction ("vlap > limber;
    vlap < contrastive"), or "none". Empty without a study."""
    if not Path(study_json).exists():
        return {}
    out = {}
    for metric, entry in json.loads(Path(study_json).read_text())["metrics"].items():
        real = [f"vlap {'>' if d['mean'] > 0 else '<'} {base}" for base, d in entry.get("vlap_minus", {}).items()
                if d["real"]]
        out[metric] = "; ".join(real) or "none"
    return out


def cell(value: float | str | None, fmt: str) -> str:
    return "–" if value is None else value if isinstance(value, str) else fmt.format(value)


def markdown_table(table: dict[str, dict[str, float | str | None]], reasons: dict[str, str] | None = None,
                   chance: dict[str, float] | None = None, verdicts: dict[str, str] | None = None) -> str:
    chance, verdicts = chance or {}, verdicts or {}
    columns = sorted({c for row in table.values() for c in row}, key=lambda c: (list(HEADLINES).index(c.split("/")[0]),
                                                                                   c))
    study = " study: real differences |" if verdicts else ""
    lines = ["| metric | " + " | ".join(table) + " | chance |" + study,
             "| --- |" + " ---: |" * (len(table) + 1) + (" --- |" if verdicts else "")]
    for col in columns:
        cells = [table[m].get(col) for m in table] + [chance.get(col)]
        fmt = "{:.3f}" if col.startswith(("caption/", "taxonomy/")) else "{:.1f}"  # scores, cosines vs percentages
        verdict = f" {verdicts.get(col, 'not in study')} |" if verdicts else ""
        lines.append(f"| {col} | " + " | ".join(cell(v, fmt) for v in cells) + " |" + verdict)
    notes = [f"* {task}: n/a, {why}" for task, why in sorted((reasons or {}).items())]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def bar_plot(table: dict[str, dict[str, float | str | None]], path: Path, chance: dict[str, float] | None = None
             ) -> None:
    chance = chance or {}
    tasks = list(HEADLINES)
    fig, axes = figure(1, len(tasks), figsize=(5.5 * len(tasks), 4.5))
    for ax, task in zip(axes, tasks):
        cols = sorted({c for row in table.values() for c, v in row.items()
                       if c.startswith(task + "/") and not isinstance(v, str)})
        if not cols:
            ax.set_title(f"{task} (n/a)" if any(task in row for row in table.values()) else task)
            ax.set_xticks([])
            continue
        width = 0.8 / max(1, len(table))
        for k, (method, row) in enumerate(table.items()):
            ax.bar([i + k * width for i in range(len(cols))], [row.get(c) or 0.0 for c in cols], width, label=method)
        chance_cols = [i for i, c in enumerate(cols) if c in chance]
        for i in chance_cols:  # chance as a black line across each group
            ax.hlines(chance[cols[i]], i - width / 2, i + 0.8 - width / 2, colors="k", linewidth=1.5,
                      label="chance" if i == chance_cols[0] else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
        ax.set_xticklabels([c.split("/", 1)[1] for c in cols], rotation=40, ha="right", fontsize=7)
        ax.set_title(task)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
