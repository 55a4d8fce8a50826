"""The report's per-client section: the fairness figures ``client-eval`` records, over seeds.

The ServerApp computes them over every client of the run's split (:mod:`resist_fl.core.client_accuracy`);
each run gives those of its last fully evaluated round (runs without ``client-eval`` add nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resist_fl.run.outputs import read_metrics
from simulations.markdown import mean_std, pm, table

FIGURES = ("mean", "worst10", "min", "std")
HEADERS = {"mean": "client mean", "worst10": "worst 10 % of clients", "min": "worst client",
           "std": "spread (std across clients)"}


def last_client_row(rows: Sequence[Mapping[str, Any]], prefix: str = "client-accuracy-") -> dict[str, float] | None:
    """The client figures (``prefix``: the global model's; ``client-tier-accuracy-``: each node's own
    tier) of the last row that has them (None: the run did not record any)."""
    return next(({f: float(row[f"{prefix}{f}"]) for f in FIGURES} for row in reversed(rows)
                 if row.get(f"{prefix}mean") is not None), None)


def client_lines(runs_dir: Path, groups: Mapping[tuple[str, str], Sequence[Any]],
                 label: Callable[[str, str], str]) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of the section and its ``report.json`` entry ({} when no run has client figures)."""
    found: dict[str, dict[str, list[float]]] = {}
    for (variant, strategy), runs in groups.items():
        for run in runs:
            rows = read_metrics(Path(runs_dir) / run.name)
            for prefix, suffix in (("client-accuracy-", ""), ("client-tier-accuracy-", ", each node's own tier")):
                figures = last_client_row(rows, prefix)
                if figures is not None:
                    for f in FIGURES:
                        found.setdefault(label(variant, strategy) + suffix, {}).setdefault(f, []).append(figures[f])
    if not found:
        return [], {}

    rows = [[name, str(len(by_figure["mean"])), *(pm(mean_std(by_figure[f])) for f in FIGURES)]
            for name, by_figure in found.items()]
    lines = ["## Per-client accuracy", "", *table(["group", "seeds", *(HEADERS[f] for f in FIGURES)], rows)]
    lines += ["", "The global model's accuracy on each client's label distribution's share of the test set "
              "(`client-eval`: the client's label mix weighting the per-label test accuracy), every client of "
              "the split, at the last round evaluated on the whole test set "
              "(\"each node's own tier\": the sub-model the client's node would run at its capacity: a width "
              "method's prefix at the node's width, DepthFL's first stages that fit with their exits, the depth "
              "prefix's first blocks that fit); worst 10 %: mean over the "
              "lowest-scoring tenth of the clients (at least one). Mean ± sample std over seeds.", ""]
    summary = {name: {f: float(np.mean(v)) for f, v in by_figure.items()} for name, by_figure in found.items()}
    return lines, {"clients": summary}
