"""``--json PATH``: a benchmark's figures as JSON, written beside what it prints.

The object holds ``"setting"`` (the first line the script prints) and the script's raw figures
(unrounded; for a script that prints a markdown table, ``"rows"``: each row as {column: cell},
the cells exactly as printed). :mod:`simulations.benchmark_figures` writes the docs' table from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def markdown_row(cells: Sequence) -> str:
    """One printed markdown table line (header or row)."""
    return "| " + " | ".join(map(str, cells)) + " |"


def write_figures(path: Path | None, setting: str, **figures) -> None:
    """Write ``{"setting": setting, **figures}`` to ``path`` (nothing when ``path`` is None), in the order given."""
    if path is not None:
        Path(path).write_text(json.dumps({"setting": setting, **figures}, indent=1) + "\n", encoding="utf-8")
