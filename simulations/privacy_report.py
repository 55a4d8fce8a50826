"""The privacy section of a comparison report: accuracy beside epsilon, holders and exposure.

Read from each run's ``metrics.jsonl`` (``epsilon`` under central DP, ``min-holders``,
``exposed-fraction``) and ``nodes.jsonl`` (``dp-epsilon`` under local DP); written by
:func:`simulations.report.build_report` when any run was private or dealt blocks to several nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resist_fl.run.outputs import CONFIG_FILE, NODES_FILE, read_json, read_metrics
from simulations.markdown import num, table

PRIVACY_PLOT = "accuracy_vs_epsilon.png"


def run_privacy(run_dir: Path) -> dict[str, Any]:
    """One run's privacy figures: its DP mode and noise, final accuracy, epsilon per evaluated
    round (central), the largest final node epsilon (local), the fewest holders and the mean exposed
    fraction over its rounds, and its mean bytes per round."""
    rows = read_metrics(run_dir)
    config = read_json(run_dir / CONFIG_FILE).get("run_config", {}) if (run_dir / CONFIG_FILE).exists() else {}
    nodes = read_metrics(run_dir, NODES_FILE) if (run_dir / NODES_FILE).exists() else []
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    node_eps = {row["node"]: float(row["dp-epsilon"]) for row in nodes  # cumulative: a node's last value counts
                if row.get("dp-epsilon") is not None}
    holders = [r["min-holders"] for r in rows if r.get("min-holders")]
    exposed = [r["exposed-fraction"] for r in rows if r.get("exposed-fraction") is not None]
    return {
        "dp": config.get("dp", "none"), "noise-multiplier": config.get("dp-noise-multiplier"),
        "min-holders-rule": config.get("privacy-min-holders", 1),
        "final-accuracy": evaluated[-1]["accuracy"] if evaluated else math.nan,
        "curve": [(r["round"], r["accuracy"], r.get("epsilon")) for r in evaluated],
        "epsilon": rows[-1].get("epsilon") if rows else None,
        "epsilon-every-round": rows[-1].get("epsilon-every-round") if rows else None,
        "sampling": config.get("dp-sampling", "public"),
        "node-epsilon": max(node_eps.values()) if node_eps else None,
        "min-holders": min(holders) if holders else None,
        "exposed-fraction": float(np.mean(exposed)) if exposed else None,
        "mb-per-round": float(np.mean([(r["bytes-down"] + r["bytes-up"]) / 1e6 for r in rows])) if rows else math.nan,
    }


def _mean(values: Sequence[float | None]) -> float:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else math.nan


def privacy_lines(runs_dir: Path, groups: dict[tuple[str, str], list[Any]],
                  label: Any) -> tuple[list[str], list[Path], dict[str, Any]]:
    """The "Privacy" section (a table and the accuracy-vs-epsilon plot), or nothing when no run
    was private and none dealt a block to several nodes."""
    figures = {label(v, s): [run_privacy(runs_dir / r.name) for r in runs] for (v, s), runs in groups.items()}
    private = any(f["dp"] != "none" or (f["min-holders-rule"] or 1) > 1 for runs in figures.values() for f in runs)
    if not private:
        return [], [], {}
    header = ["group", "seeds", "dp", "z", "final accuracy", "epsilon (central)", "epsilon, every round (central)",
              "node epsilon (local, max)",
              "fewest holders", "exposed fraction", "MB / round"]
    rows = []
    for name, runs in figures.items():
        accuracy = [f["final-accuracy"] for f in runs]
        spread = float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else 0.0
        z = runs[0]["noise-multiplier"] if runs[0]["dp"] != "none" else None
        holders = [f["min-holders"] for f in runs if f["min-holders"] is not None]
        rows.append([name, str(len(runs)), runs[0]["dp"], "-" if z is None else f"{z:g}",
                     f"{_mean(accuracy):.4f} ± {spread:.4f}", num(_mean([f["epsilon"] for f in runs]), 2),
                     num(_mean([f["epsilon-every-round"] for f in runs]), 2),
                     num(_mean([f["node-epsilon"] for f in runs]), 2), str(min(holders)) if holders else "-",
                     num(_mean([f["exposed-fraction"] for f in runs]), 3),
                     num(_mean([f["mb-per-round"] for f in runs]), 3)])
    lines = ["## Privacy", "", *table(header, rows), "",
             "epsilon (central): the worst node's after the last round (public sampling: each node composes "
             "the rounds it was sent a model in, no amplification, add/remove one node; secret sampling: the "
             "amplified accountant, n of N without replacement, replace-one), delta from the run config, mean "
             "over seeds; every round: the planning bound, a node in every round; node epsilon (local): the "
             "largest cumulative Opacus epsilon any node reported; fewest "
             "holders: the smallest number of nodes any updated parameter was merged over in any round; exposed "
             "fraction: the mean over rounds of the share of the round's updates (node x parameter) merged over "
             "fewer than max(2, privacy-min-holders) nodes.", ""]
    return lines, [plot_accuracy_vs_epsilon(figures, runs_dir / PRIVACY_PLOT)], {"privacy": figures}


def plot_accuracy_vs_epsilon(figures: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Accuracy after each round against the epsilon spent by then (central-DP groups, mean over
    seeds per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in figures.items():
        curves = [f["curve"] for f in runs if f["dp"] == "central" and f["curve"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        eps = np.mean([[p[2] or 0.0 for p in c[:length]] for c in curves], axis=0)
        acc = np.mean([[p[1] for p in c[:length]] for c in curves], axis=0)
        ax.plot(eps, acc, marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta from the run config)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
