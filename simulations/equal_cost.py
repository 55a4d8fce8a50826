"""Accuracy at equal cost: each method against the training FLOPs and the bytes it has spent, and
whether each method has converged (what each figure is: the notes :func:`equal_cost_lines` writes under
its tables; simulations/README.md, "Report").

At a budget B, a run's accuracy is that of its last evaluated round whose cumulative cost is at most B. The
budgets are fractions of the median of the methods' mean totals: the smallest total would put the budgets
below the first evaluation of every method but the cheapest (a width-1/16 FedAvg-small spends 2 % of
FedAvg's FLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resist_fl.run.outputs import CONFIG_FILE, NODES_FILE, read_json, read_metrics
from simulations.markdown import mean_std, pm, table
from simulations.paired_stats import LATE_FRACTION

BUDGET_FRACTIONS = (0.25, 0.5, 1.0)
"""The budgets of the equal-cost table, as fractions of the median of the methods' mean totals."""
SPENT_MARK = " (all)"
"""Marks a cell whose method spent less than the budget in all: its final accuracy."""
PLATEAU_WINDOW = LATE_FRACTION  # the same last fifth as the late accuracy
PLATEAU_GAIN = 0.01
"""Plateau: the mean accuracy of the last 20 % of the rounds is less than 1 point above the 20 % before."""


@dataclass(frozen=True)
class CostCurve:
    """One run's evaluated rounds with their accuracy and the cumulative FLOPs and bytes spent by then."""

    round: np.ndarray
    accuracy: np.ndarray
    flops: np.ndarray
    bytes: np.ndarray

    def at(self, kind: str, budget: float) -> float:
        """Accuracy of the last evaluated round whose cumulative ``kind`` cost is within ``budget`` (NaN: none)."""
        within = np.nonzero(getattr(self, kind) <= budget * (1 + 1e-12))[0]
        return float(self.accuracy[within[-1]]) if len(within) else math.nan


def round_flops(nodes: Sequence[Mapping[str, Any]], run_config: Mapping[str, Any]) -> dict[int, float] | None:
    """Training FLOPs of each round (None when a node's cost or steps are not known)."""
    batch = int(run_config.get("batch-size", 0))
    steps = run_config.get("local-steps")
    default_steps = int(steps) if steps is not None and not run_config.get("local-epochs") else None
    totals: dict[int, float] = {}
    for row in nodes:
        if row.get("status") != "accepted":
            continue
        steps = row.get("local-steps") if row.get("local-steps") is not None else default_steps
        if row.get("flops-per-sample") is None or steps is None or not batch:
            return None
        totals[int(row["round"])] = totals.get(int(row["round"]), 0.0) + row["flops-per-sample"] * steps * batch
    return totals


def cost_curve(run_dir: Path) -> CostCurve | None:
    """The run's :class:`CostCurve` (None without the per-node costs)."""
    config_path = run_dir / CONFIG_FILE
    run_config = read_json(config_path).get("run_config", {}) if config_path.exists() else {}
    per_round = round_flops(read_metrics(run_dir, NODES_FILE), run_config)
    rows = sorted(read_metrics(run_dir), key=lambda r: r["round"])
    if not per_round or not rows:
        return None
    cumulative = np.cumsum([per_round.get(int(r["round"]), 0.0) for r in rows])
    keep = [i for i, r in enumerate(rows) if r.get("accuracy") is not None]
    return CostCurve(round=np.array([rows[i]["round"] for i in keep], dtype=int),
                     accuracy=np.array([rows[i]["accuracy"] for i in keep], dtype=float),
                     flops=cumulative[keep],
                     bytes=np.array([float(rows[i]["cumulative-bytes"]) for i in keep]))


def budgets(curves: Mapping[str, Sequence[CostCurve]], kind: str) -> list[float]:
    """:data:`BUDGET_FRACTIONS` of the median over the groups of their mean final cumulative ``kind`` cost."""
    totals = [float(np.mean([getattr(c, kind)[-1] for c in runs])) for runs in curves.values() if runs]
    middle = float(np.median(totals)) if totals else math.nan
    return [fraction * middle for fraction in BUDGET_FRACTIONS]


def plateau(curves: Sequence[CostCurve], num_rounds: int) -> tuple[float, bool] | None:
    """A method's gain (mean accuracy over the last :data:`PLATEAU_WINDOW` of the rounds minus the
    window before, averaged over its seeds) and whether it is below :data:`PLATEAU_GAIN`."""
    span = max(1, round(PLATEAU_WINDOW * num_rounds))
    gains = []
    for curve in curves:
        last = curve.accuracy[curve.round > num_rounds - span]
        before = curve.accuracy[(curve.round > num_rounds - 2 * span) & (curve.round <= num_rounds - span)]
        if len(last) and len(before):
            gains.append(float(last.mean() - before.mean()))
    if not gains:
        return None
    gain = float(np.mean(gains))
    return gain, gain < PLATEAU_GAIN


def _cell(runs: Sequence[CostCurve], kind: str, budget: float) -> str:
    values = [c.at(kind, budget) for c in runs]
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    spent = all(getattr(c, kind)[-1] <= budget * (1 + 1e-12) for c in runs)
    return pm(mean_std(finite)) + ("" if len(finite) == len(values) else f" ({len(finite)}/{len(values)})") \
        + (SPENT_MARK if spent else "")


def equal_cost_lines(curves: Mapping[str, Sequence[CostCurve]],
                     num_rounds: int | None) -> tuple[list[str], dict[str, Any]]:
    """The report's section: accuracy at fixed FLOP and byte budgets, and every method's plateau check."""
    curves = {name: runs for name, runs in curves.items() if runs}
    if not curves:
        return [], {}
    flop_budgets, byte_budgets = budgets(curves, "flops"), budgets(curves, "bytes")
    head = ([f"{b / 1e12:.3g} TFLOP" for b in flop_budgets] + [f"{b / 1e9:.3g} GB" for b in byte_budgets])
    rows = []
    found: dict[str, Any] = {}
    for name, runs in curves.items():
        at_flops = [_cell(runs, "flops", b) for b in flop_budgets]
        at_bytes = [_cell(runs, "bytes", b) for b in byte_budgets]
        total = float(np.mean([c.flops[-1] for c in runs]))
        rows.append([name, f"{total / 1e12:.3g}", *at_flops, *at_bytes])
        found[name] = {"total-tflop": total / 1e12, "at-tflop": dict(zip([b / 1e12 for b in flop_budgets], at_flops)),
                       "at-gb": dict(zip([b / 1e9 for b in byte_budgets], at_bytes))}
    lines = ["## Accuracy at equal cost", "",
             "Accuracy (mean ± std over seeds) of the last evaluated round within each budget of cumulative training "
             "FLOPs (over the nodes that replied: the sub-model's FLOPs per sample x local steps x batch size) and "
             "of cumulative bytes (arrays down and up); the budgets are 25 / 50 / 100 % of the median of the "
             "methods' totals. \"(all)\": the method spent less than the budget in the whole run, and its cell is "
             "its final accuracy. FjORD's FLOPs are its largest level's (its batches train that level or a smaller "
             "one, so it spends less), and FjORD with distillation's second pass per batch is not counted.", "",
             *table(["method", "total TFLOP", *head], rows), ""]
    checked = {name: plateau(runs, num_rounds) for name, runs in curves.items()} if num_rounds else {}
    checked = {name: c for name, c in checked.items() if c is not None}
    if checked:
        rising = [name for name, (_, flat) in checked.items() if not flat]
        lines += [f"Convergence: each method's mean accuracy over the last {PLATEAU_WINDOW:.0%} of the {num_rounds} "
                  f"rounds minus its mean over the {PLATEAU_WINDOW:.0%} before (averaged over its seeds); the rule "
                  f"says it has plateaued when the gain is below {PLATEAU_GAIN}. "
                  + (f"Not plateaued: {', '.join(rising)}; longer runs may raise them, so at this length "
                     "the comparison may understate them." if rising else "Every method has plateaued."), "",
                  *table(["method", "gain", "plateaued"],
                         [[name, f"{gain:+.4f}", "yes" if flat else "**no**"]
                          for name, (gain, flat) in checked.items()]),
                  ""]
        found["plateaus"] = {name: {"gain": gain, "plateaued": flat} for name, (gain, flat) in checked.items()}
    return lines, found

