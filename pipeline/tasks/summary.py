"""One table of every method x every task's headline metrics, and a bar plot."""
from __future__ import annotations

import json
from pathlib import Path

HEADLINES = {  # task -> metric keys shown in the comparison (all are "higher is better")
    "caption": ["CIDEr", "METEOR", "BLEU-1"],
    "vqa": ["0shot_open_accuracy", "0shot_closed_accuracy", "nshot_open_accuracy", "nshot_closed_accuracy"],
    "retrieval": ["cosine_i2t_R@1", "cosine_t2i_R@1", "assignment_i2t_R@1", "assignment_t2i_R@1"],
    "arithmetic": ["color_swap_top1", "shape_swap_top1"],
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


def collect(metrics_dir: Path, methods: list[str]) -> dict[str, dict[str, float | None]]:
    """method -> {task/metric: value}; a missing file gives no entries for that task."""
    table = {}
    for method in methods:
        row = {}
        for task in HEADLINES:
            path = Path(metrics_dir) / task / f"{method}.json"
            if path.exists():
                row |= headline_values(json.loads(path.read_text()), task)
        table[method] = row
    return table


def markdown_table(table: dict[str, dict[str, float | None]]) -> str:
    columns = sorted({c for row in table.values() for c in row}, key=lambda c: (list(HEADLINES).index(c.split("/")[0]),
                                                                                   c))
    lines = ["| metric | " + " | ".join(table) + " |", "| --- |" + " ---: |" * len(table)]
    for col in columns:
        cells = [table[m].get(col) for m in table]
        fmt = "{:.3f}" if col.startswith("caption/") else "{:.1f}"  # COCO scores vs percentages
        lines.append(f"| {col} | " + " | ".join("–" if v is None else fmt.format(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(table: dict[str, dict[str, float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(HEADLINES)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4))
    for ax, task in zip(axes, tasks):
        cols = sorted({c for row in table.values() for c in row if c.startswith(task + "/")})
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
