"""What every report section and docs block is written with: Markdown tables, ``mean ± std`` cells, figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    array = np.asarray(values, dtype=float)
    if not len(array):
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def pm(values: tuple[float, float], digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std``, or ``-`` when missing."""
    mean, std = values
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def num(value: float, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend), imported where a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, **savefig) -> Path:
    """``fig`` laid out, written to ``path`` (``savefig``: its options) and closed."""
    fig.tight_layout()
    fig.savefig(path, **savefig)
    pyplot().close(fig)
    return path
