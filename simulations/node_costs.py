"""Per-node costs and projected time at real link speeds, from ``nodes.jsonl`` (no re-running).

A simulated round on one host moves bytes through memory; a federated round moves them over links. So the
report projects each round's time from what was measured, at given link speeds::

    round time = max over the round's nodes with a valid reply of
                 (bytes down + bytes up) x 8 / (link Mbit/s x 1e6) + training seconds (simulated slowdown included)

(every node has its own link; server compute, latency and evaluation are left out).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resist_fl.run.outputs import NODES_FILE, read_metrics
from simulations.markdown import pyplot, save, table

DEFAULT_BANDWIDTHS = (10.0, 100.0, 1000.0)
"""Link speeds (Mbit/s) the report projects round times at."""


def projected_round_seconds(nodes: Sequence[Mapping[str, Any]], mbps: float) -> dict[int, float]:
    """Projected seconds of each round at ``mbps`` (see the module docstring)."""
    if not mbps > 0:
        raise ValueError(f"link speed must be > 0 Mbit/s, got {mbps}")
    rounds: dict[int, float] = defaultdict(float)
    for row in nodes:
        if row.get("train-seconds") is None:  # no valid reply: the round did not wait for it
            continue
        seconds = (row["bytes-down"] + row["bytes-up"]) * 8 / (mbps * 1e6) + row["train-seconds"]
        rounds[int(row["round"])] = max(rounds[int(row["round"])], seconds)
    return dict(rounds)


def time_to_target(metrics: Sequence[Mapping[str, Any]], round_seconds: Mapping[int, float],
                   target: float) -> float | None:
    """Projected seconds until the first evaluated round with accuracy >= ``target`` (None: never)."""
    elapsed = 0.0
    for row in sorted(metrics, key=lambda r: r["round"]):
        elapsed += round_seconds.get(int(row["round"]), 0.0)
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return elapsed
    return None


def run_projection(run_dir: Path, bandwidths: Sequence[float], target: float | None) -> dict[str, Any] | None:
    """Mean projected round time and time to target at each bandwidth for one run (None
    without ``nodes.jsonl``)."""
    nodes = read_metrics(run_dir, NODES_FILE)
    if not nodes:
        return None
    metrics = sorted(read_metrics(run_dir), key=lambda r: r["round"])
    out: dict[str, Any] = {}
    for mbps in bandwidths:
        seconds = projected_round_seconds(nodes, mbps)
        out[mbps] = {"round-seconds": float(np.mean(list(seconds.values()))) if seconds else math.nan,
                     "to-target": time_to_target(metrics, seconds, target) if target is not None else None,
                     "cumulative": np.cumsum([seconds.get(int(r["round"]), 0.0) for r in metrics]).tolist(),
                     "accuracy": [r.get("accuracy") for r in metrics]}
    return out


def node_summary(run_dirs: Sequence[Path]) -> dict[str, Any] | None:
    """Distribution of the per-node costs over every node-round of ``run_dirs``."""
    rows = [r for d in run_dirs for r in read_metrics(d, NODES_FILE)]
    if not rows:
        return None

    def spread(key: str) -> tuple[float, float, float]:
        return spread_of([float(r[key]) for r in rows if r.get(key) is not None])

    by_capacity: dict[float, list[int]] = defaultdict(list)
    budget: dict[float, list[float]] = defaultdict(list)  # what was sent over the node's budget (1: all of it)
    for r in rows:
        by_capacity[float(r["capacity"])].append(int(r["blocks"]))
        if r.get("budget-used") is not None:
            budget[float(r["capacity"])].append(float(r["budget-used"]))
    measures = sorted({r["memory-measure"] for r in rows if r.get("memory-measure")})
    return {"node-rounds": len(rows), "train-seconds": spread("train-seconds"),
            "simulated-seconds": spread("simulated-seconds"), "peak-memory-mb": spread("peak-memory-mb"),
            "mb-per-node-round": spread_of([(r["bytes-down"] + r["bytes-up"]) / 1e6 for r in rows]),
            "over-capacity": sum(int(r.get("over-capacity") or 0) for r in rows),
            "blocks-by-capacity": {c: float(np.mean(b)) for c, b in sorted(by_capacity.items(), reverse=True)},
            "budget-by-capacity": {c: float(np.mean(b)) for c, b in sorted(budget.items(), reverse=True)},
            "memory-measure": ", ".join(measures) or "-"}


def spread_of(values: Sequence[float]) -> tuple[float, float, float]:
    """Minimum, median and maximum (NaN for no values)."""
    if not values:
        return math.nan, math.nan, math.nan
    return float(np.min(values)), float(np.median(values)), float(np.max(values))


def _fmt(values: tuple[float, float, float], digits: int = 2) -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    return " / ".join(f"{v:.{digits}f}" for v in values)


def node_cost_lines(groups: Mapping[str, dict[str, Any]]) -> list[str]:
    """Markdown: per group, the distribution of the per-node costs (min / median / max), and, where
    the runs recorded it, the mean budget used per capacity class (what was sent over the node's
    budget under the run's ``capacity-measure``: 1.00 is all of it, above 1 over capacity)."""
    budgets = any(s.get("budget-by-capacity") for s in groups.values())
    head = ["group", "node-rounds", "train s (min / median / max)", "of it simulated s",
            "peak memory MB", "memory measure", "MB down+up per node-round", "mean blocks by capacity",
            *(["mean budget used by capacity"] if budgets else []), "node-rounds over capacity"]
    rows = []
    for name, s in groups.items():
        blocks = ", ".join(f"{c:g}: {b:.1f}" for c, b in s["blocks-by-capacity"].items())
        used = [", ".join(f"{c:g}: {b:.2f}" for c, b in s.get("budget-by-capacity", {}).items()) or "-"]
        rows.append([name, str(s["node-rounds"]), _fmt(s["train-seconds"]), _fmt(s["simulated-seconds"]),
                     _fmt(s["peak-memory-mb"], 1), s["memory-measure"], _fmt(s["mb-per-node-round"], 3), blocks,
                     *(used if budgets else []), str(s["over-capacity"])])
    return table(head, rows)


def link_time_lines(groups: Mapping[str, list[dict[str, Any]]], bandwidths: Sequence[float],
                    target: float | None) -> list[str]:
    """Markdown: per group and link speed, the mean projected round time and time to target
    (means over the seeds; the seeds that reached the target / all)."""
    head = ["group"] + [f"{b:g} Mbit/s: round s" for b in bandwidths] + \
        [f"{b:g} Mbit/s: s to target" for b in bandwidths]
    rows = []
    for name, runs in groups.items():
        cells = [name]
        cells += [f"{np.mean([r[b]['round-seconds'] for r in runs]):.2f}" for b in bandwidths]
        for b in bandwidths:
            hits = [r[b]["to-target"] for r in runs if r[b]["to-target"] is not None]
            cells.append(f"{np.mean(hits):.1f} ({len(hits)}/{len(runs)})" if hits and target is not None else
                         f"- (0/{len(runs)})")
        rows.append(cells)
    return table(head, rows)


def plot_link_times(groups: Mapping[str, list[dict[str, Any]]], bandwidths: Sequence[float], path: Path,
                    target: float | None) -> Path:
    """Accuracy against projected time, one panel per link speed (first seed of each group)."""
    fig, axes = pyplot().subplots(1, len(bandwidths), figsize=(4.2 * len(bandwidths), 3.8), dpi=110, squeeze=False)
    for ax, mbps in zip(axes[0], bandwidths):
        for name, runs in groups.items():
            run = runs[0][mbps]
            points = [(t, a) for t, a in zip(run["cumulative"], run["accuracy"]) if a is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{mbps:g} Mbit/s per node", fontsize=10)
        ax.set_xlabel("projected seconds")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save(fig, path)
