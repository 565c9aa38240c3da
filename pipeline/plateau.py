"""When a validation curve has flattened: the plateau criterion of `vlap curves`.

A run at a constant learning rate has plateaued at step t when its validation loss improved by less than
`tolerance` (relative) over the last `window` of its steps: from the last point at or before (1 - window)·t
to the point at t. A rise counts as no improvement. Before `min_step` no verdict is given: the first
epochs improve fast enough that a flat stretch there is noise, not a plateau.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Plateau:
    reached: bool
    step: int  # the latest point's step (1-based: steps done)
    reference_step: int  # the point the improvement is measured from, ~ (1 - window)·step
    loss: float  # at `step`
    improvement: float  # (loss at reference - loss) / loss at reference
    slope_per_1k: float  # least-squares slope of the loss over the window, per 1,000 steps (< 0: improving)

    def as_dict(self) -> dict:
        return asdict(self)


def plateau(points: list[tuple[int, float]], window: float = 0.2, tolerance: float = 0.01,
            min_step: int = 0) -> Plateau | None:
    """The verdict at the last of `points` ((steps done, loss), increasing steps); None before there are two
    points a window apart."""
    if len(points) < 2:
        return None
    steps = np.array([s for s, _ in points], dtype=float)
    losses = np.array([v for _, v in points], dtype=float)
    last = int(steps[-1])
    earlier = np.flatnonzero(steps <= (1.0 - window) * last)
    if not len(earlier):
        return None
    ref = earlier[-1]
    improvement = float((losses[ref] - losses[-1]) / losses[ref])
    span = slice(ref, None)
    slope = float(np.polyfit(steps[span], losses[span], 1)[0] * 1000) if len(steps[span]) > 1 else 0.0
    return Plateau(reached=last >= min_step and improvement < tolerance, step=last, reference_step=int(steps[ref]),
                   loss=float(losses[-1]), improvement=improvement, slope_per_1k=slope)
