"""One table of every method x every task's headline metrics, and a bar plot."""
from __future__ import annotations

import json
from pathlib import Path

HEADLINES = {  # task -> metric keys shown in the comparison (numbers are all "higher is better")
    "caption": ["CIDEr", "METEOR", "BLEU-1"],
    "vqa": ["0shot_open_accuracy", "0shot_closed_accuracy", "nshot_open_accuracy", "nshot_closed_accuracy"],
    # natural_*: the scorer the method was trained for (natural_scorer names it); the others for comparison
    "retrieval": ["natural_scorer", "natural_i2t_R@1", "natural_t2i_R@1", "natural_i2t_R@5", "cosine_i2t_R@1",
                  "assignment_i2t_R@1", "centred_i2t_R@1"],
    "arithmetic": ["color_swap_top1", "shape_swap_top1", "word_swap_top1"],
}


def headline_values(metrics: dict, task: str) -> dict[str, float | None]:
    """The task's headline metrics; 'nshot' resolves to the n-shot setting present in the file."""
    nshot = next((k.split("_")[0] for k in metrics if k.endswith("shot_open_accuracy") and not k.startswith("0shot")),
                 None)
    out = {}
    for key in HEADLINES[task]:
        real = key.replace("nshot", nshot) if key.startswith("nshot") and nshot else key
        out[f"{task}/{real}"] = metrics.get(real)
    return out


NOT_APPLICABLE = "n/a"


def collect(metrics_dir: Path, methods: list[str]) -> tuple[dict[str, dict[str, float | str | None]], dict[str, str]]:
    """(method -> {task/metric: value or "n/a"}, task -> why it is not applicable).

    A missing file gives no entries for that task; a task the data lacks inputs for gives one
    "n/a" cell per method and its reason."""
    table, reasons = {}, {}
    for method in methods:
        row = {}
        for task in HEADLINES:
            path = Path(metrics_dir) / task / f"{method}.json"
            if not path.exists():
                continue
            metrics = json.loads(path.read_text())
            if metrics.get("applicable", True):
                row |= headline_values(metrics, task)
            else:
                row[task] = NOT_APPLICABLE
                reasons[task] = metrics.get("reason", "")
        table[method] = row
    return table, reasons


def cell(value: float | str | None, fmt: str) -> str:
    return "–" if value is None else value if isinstance(value, str) else fmt.format(value)


def markdown_table(table: dict[str, dict[str, float | str | None]], reasons: dict[str, str] | None = None) -> str:
    columns = sorted({c for row in table.values() for c in row}, key=lambda c: (list(HEADLINES).index(c.split("/")[0]),
                                                                                   c))
    lines = ["| metric | " + " | ".join(table) + " |", "| --- |" + " ---: |" * len(table)]
    for col in columns:
        cells = [table[m].get(col) for m in table]
        fmt = "{:.3f}" if col.startswith("caption/") else "{:.1f}"  # COCO scores vs percentages
        lines.append(f"| {col} | " + " | ".join(cell(v, fmt) for v in cells) + " |")
    notes = [f"* {task}: n/a, {why}" for task, why in sorted((reasons or {}).items())]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def bar_plot(table: dict[str, dict[str, float | str | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(HEADLINES)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4))
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
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
        ax.set_xticklabels([c.split("/", 1)[1] for c in cols], rotation=30, ha="right", fontsize=8)
        ax.set_title(task)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
