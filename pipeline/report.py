"""Tables and figures of the reports (summary, study, tune, ablation), each written atomically.

Every report renders its markdown with `markdown_table` and draws with `figure`, then writes through
`write_markdown` / `save_figure`: a temp file beside the target, renamed onto it only when complete,
so an interrupted run leaves the previous report, never half of one.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_path, write_text_atomic


def markdown_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A markdown table; columns in `right` are right-aligned (numbers)."""
    right = right or set()
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(" ---: " if i in right else " --- " for i in range(len(header))).replace("  ", " ") + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, text: str) -> None:
    write_text_atomic(path, text)


def figure(nrows: int, ncols: int, **kwargs):
    """(figure, axes) from matplotlib's file-only backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """The figure as a PNG at `path`, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
