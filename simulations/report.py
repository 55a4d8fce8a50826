"""Plots and a Markdown report from run directories (no re-running).

Usage::

    python -m simulations.report RUNS_DIR [--target-accuracy A | --target-fraction F]

``RUNS_DIR`` is a ``simulations.compare`` output directory: run directories named
``<variant>-<strategy>-seed<N>`` plus ``compare.json``, the manifest that says which ran and as which
variant, strategy and seed (without it: an error, exit 2). What the report gives and how each figure is
defined (final and late accuracy, the target, time to target, ratios): simulations/README.md, "Report",
and the notes the report prints under its tables.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from resist_fl.run.outputs import CONFIG_FILE, NODES_FILE, read_json, read_metrics, write_json
from resist_fl.run.methods import label  # the method table's labels (former names read too)
from resist_fl.run.settings import RunSettings
from simulations.equal_cost import CostCurve, cost_curve, equal_cost_lines
from simulations.markdown import mean_std, num, pm, pyplot, save, table
from simulations.tuning import is_tuning, tuning_lines
from simulations.machine import describe_machine, machine_line
from simulations.paired_stats import LEVEL, holm, late_accuracy, paired
from simulations.presets import RUNNER_KEYS, cell_names
from simulations.node_costs import (DEFAULT_BANDWIDTHS, link_time_lines, node_cost_lines, node_summary,
                                    plot_link_times, run_projection)

MANIFEST_FILE = "compare.json"
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
MAIN_VARIANT = "main"
DEFAULT_TARGET_FRACTION = 0.9
PLOTS = {"round": ("accuracy_vs_round.png", "round"),
         "gb": ("accuracy_vs_gb.png", "cumulative communication (GB)"),
         "seconds": ("accuracy_vs_seconds.png", "wall-clock seconds (sum of round-seconds)"),
         "tflops": ("accuracy_vs_tflops.png", "cumulative training TFLOPs (nodes that replied)")}


def finite(obj: Any) -> Any:
    """``obj`` with NaN replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Curve:
    """One run's evaluated rounds and where it stood at each (x values for the three plots)."""

    round: np.ndarray
    accuracy: np.ndarray
    gb: np.ndarray
    seconds: np.ndarray
    bytes_per_round: float
    diverging_rounds: int = 0
    tflops: np.ndarray | None = None
    """Cumulative training TFLOPs at each evaluated round (:mod:`simulations.equal_cost`; None: not recorded)."""

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> "Curve":
        """From ``metrics.jsonl`` rows (rows without an evaluation are skipped, but counted in time)."""
        rows = sorted(rows, key=lambda r: r["round"])
        seconds = np.cumsum([float(r.get("round-seconds") or 0.0) for r in rows])
        keep = [i for i, r in enumerate(rows) if r.get("accuracy") is not None]
        per_round = [r["bytes-down"] + r["bytes-up"] for r in rows]
        return cls(round=np.array([rows[i]["round"] for i in keep], dtype=int),
                   accuracy=np.array([rows[i]["accuracy"] for i in keep], dtype=float),
                   gb=np.array([rows[i]["cumulative-bytes"] / 1e9 for i in keep], dtype=float),
                   seconds=seconds[keep] if keep else np.array([]),
                   bytes_per_round=float(np.mean(per_round)) if per_round else math.nan,
                   diverging_rounds=sum(int(r.get("diverging") or 0) for r in rows))

    @property
    def final_accuracy(self) -> float:
        return float(self.accuracy[-1]) if len(self.accuracy) else math.nan

    @property
    def late_accuracy(self) -> float:
        """The mean accuracy of the evaluations in the last fifth of the rounds (:func:`late_accuracy`)."""
        return late_accuracy(self.round, self.accuracy)

    def to_target(self, target: float) -> dict[str, float] | None:
        """Rounds, GB and seconds at the first evaluated round with accuracy >= ``target``."""
        hits = np.nonzero(self.accuracy >= target)[0]
        if not len(hits):
            return None
        i = int(hits[0])
        return {"rounds": float(self.round[i]), "gb": float(self.gb[i]), "seconds": float(self.seconds[i])}


@dataclass
class Run:
    """A finished run: where it belongs and its curve."""

    name: str
    variant: str
    strategy: str
    seed: int
    curve: Curve
    launch: dict[str, Any] = field(default_factory=dict)
    costs: CostCurve | None = None
    """Its cumulative training FLOPs and bytes (:mod:`simulations.equal_cost`; None: not recorded)."""


def discover_runs(runs_dir: Path, manifest: dict[str, Any]) -> list[Run]:
    """The finished runs the manifest lists (status ok or reused)."""
    entries = [e for e in manifest.get("runs", []) if e.get("status") in ("ok", "reused")]
    return [Run(e["name"], e["variant"], e["strategy"], int(e["seed"]),
                Curve.from_rows(read_metrics(runs_dir / e["name"])), e) for e in entries]


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (variant, strategy): main first, then in the order met; ResIST before FedAvg."""
    variants = [MAIN_VARIANT] + [r.variant for r in runs if r.variant != MAIN_VARIANT]
    order = {v: i for i, v in enumerate(dict.fromkeys(variants))}
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (order[r.variant], r.strategy != "resist", r.seed)):
        groups.setdefault((run.variant, run.strategy), []).append(run)
    return groups


def preset_target(groups: dict[tuple[str, str], list[Run]], manifest: dict[str, Any], accuracy: float | None = None,
                  fraction: float | None = None) -> tuple[float | None, str]:
    """The target of a comparison and how it was chosen: ``accuracy`` / ``fraction`` when given, else its
    preset's (``compare.json``); with no accuracy, ``fraction`` x the best mean final FedAvg accuracy."""
    preset = manifest.get("target") or {}
    accuracy = accuracy if accuracy is not None else preset.get("accuracy")
    fraction = fraction or preset.get("fraction-of-fedavg") or DEFAULT_TARGET_FRACTION
    if accuracy is not None:
        return float(accuracy), f"fixed target {accuracy:.4f}"
    finals = {variant: mean_std([r.curve.final_accuracy for r in runs])[0]
              for (variant, strategy), runs in groups.items() if strategy == "fedavg"}
    if not finals:
        return None, "no FedAvg run, so no target"
    variant, best = max(finals.items(), key=lambda item: item[1])
    return fraction * best, (f"{fraction:g} x the best mean final FedAvg accuracy "
                             f"({best:.4f}, variant {variant})")


@dataclass(frozen=True)
class GroupStats:
    """Seeds of one (variant, strategy) summarised."""

    variant: str
    strategy: str
    seeds: int
    final: tuple[float, float]
    late: tuple[float, float]
    bytes_per_round: float
    reached: int
    rounds: tuple[float, float]
    gb: tuple[float, float]
    seconds: tuple[float, float]
    startup: float
    wall: float
    diverged: int = 0


def group_stats(variant: str, strategy: str, runs: Sequence[Run], target: float | None) -> GroupStats:
    """Final accuracy, traffic, time to target and launch times of a group."""
    hits = [h for h in (r.curve.to_target(target) for r in runs) if h] if target is not None else []
    launch = [r.launch for r in runs]
    return GroupStats(
        variant=variant, strategy=strategy, seeds=len(runs),
        final=mean_std([r.curve.final_accuracy for r in runs]),
        late=mean_std([r.curve.late_accuracy for r in runs]),
        bytes_per_round=mean_std([r.curve.bytes_per_round for r in runs])[0],
        reached=len(hits),
        rounds=mean_std([h["rounds"] for h in hits]), gb=mean_std([h["gb"] for h in hits]),
        seconds=mean_std([h["seconds"] for h in hits]),
        startup=mean_std([x["seconds-to-round1"] for x in launch if x.get("seconds-to-round1") is not None])[0],
        wall=mean_std([x["wall-seconds"] for x in launch if x.get("wall-seconds") is not None])[0],
        diverged=sum(r.curve.diverging_rounds > 0 for r in runs))


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when either is missing or the denominator is 0."""
    return math.nan if math.isnan(numerator) or math.isnan(denominator) or denominator == 0 else numerator / denominator


def ratios(stats: Sequence[GroupStats], base: str = MAIN_VARIANT) -> list[dict[str, Any]]:
    """ResIST / FedAvg of every ResIST group, against FedAvg of its variant (else of ``base``: main, or a
    grid's first cell, which its ablations change)."""
    fedavg = {s.variant: s for s in stats if s.strategy == "fedavg"}
    rows = []
    for s in stats:
        ref = fedavg.get(s.variant) or fedavg.get(base)
        if s.strategy != "resist" or ref is None:
            continue
        rows.append({"variant": s.variant, "against": ref.variant,
                     "final-accuracy": ratio(s.final[0], ref.final[0]),
                     "bytes-per-round": ratio(s.bytes_per_round, ref.bytes_per_round),
                     "rounds": ratio(s.rounds[0], ref.rounds[0]), "gb": ratio(s.gb[0], ref.gb[0]),
                     "seconds": ratio(s.seconds[0], ref.seconds[0])})
    return rows


def mean_curve(runs: Sequence[Run], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean and std of accuracy over seeds, on the evaluated rounds all seeds share."""
    common = sorted(set.intersection(*(set(r.curve.round.tolist()) for r in runs)))
    xs, ys = [], []
    for run in runs:
        index = np.searchsorted(run.curve.round, common)
        xs.append(getattr(run.curve, x)[index])
        ys.append(run.curve.accuracy[index])
    xs_a, ys_a = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    std = ys_a.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))
    return xs_a.mean(axis=0), ys_a.mean(axis=0), std


def plot(groups: dict[tuple[str, str], list[Run]], x: str, path: Path, title: str,
         target: float | None) -> Path:
    """Accuracy against ``x`` (round, gb, seconds, tflops): mean line and ± std band per group (a group
    whose runs did not all record ``x`` is left out)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), dpi=120)
    for (variant, strategy), runs in groups.items():
        if any(getattr(r.curve, x) is None for r in runs):  # a cost some run did not record
            continue
        mx, my, sd = mean_curve(runs, x)
        name = group_label(variant, strategy)
        style = "-" if strategy == "resist" else "--"
        (line,) = ax.plot(mx, my, style, marker="o", markersize=3, label=f"{name}, n={len(runs)}")
        ax.fill_between(mx, my - sd, my + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel(PLOTS[x][1])
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def setup_lines(manifest: dict[str, Any]) -> list[str]:
    """The main run config and federation, from the first reported run of the manifest (a tuning run's
    rounds and rate are the grid's, not the comparison's; with a learning-rate grid, ``lr`` is each
    method's pick, given in the grid's table)."""
    runs = [r for r in manifest.get("runs", []) if not is_tuning(r.get("variant", ""))] or manifest.get("runs", [])
    if not runs:  # (a grid alone: its first tuning run, whose lr the grid's table gives)
        return []
    config = {k: v for k, v in runs[0].get("run-config", {}).items() if k not in RUNNER_KEYS}
    picked = bool(manifest.get("tuning")) and config.pop("lr", None) is not None
    defaults = RunSettings.model_fields
    if config.get("norm", defaults["norm"].default) == "batchnorm":  # how the central evaluation normalises
        config.setdefault("bn-statistics", defaults["bn_statistics"].default)
    federation = manifest.get("federation", {})
    pairs = [f"{k}={v}" for k, v in federation.items()] + [f"{k}={v}" for k, v in config.items()]
    grid = manifest.get("grid")
    cells = [f"A grid: each variant `<norm>-<alpha>` sets `norm`, `partitioner` and `dirichlet-alpha` (alphas "
             f"{', '.join(map(str, grid['alphas']))}; norms {', '.join(grid['norms'])}; alpha iid: "
             "`partitioner=iid`). The line above is the first cell's; an ablation changes that cell.", ""] \
        if grid else []
    lr = ["`lr`: each method's pick in the learning-rate grid (below).", ""] if picked else []
    return ["## Setup", "", "`" + " ".join(pairs) + "`", "", *lr, *cells] if pairs else []


def results_lines(stats: Sequence[GroupStats], target: float | None) -> list[str]:
    head = ["variant", "strategy", "seeds", "final accuracy", "late accuracy", "MB / round", "reached target",
            "rounds to target", "GB to target", "seconds to target", "s to round 1", "run wall s",
            "runs diverging"]
    rows = [[s.variant, label(s.strategy), str(s.seeds), pm(s.final), pm(s.late),
             num(s.bytes_per_round / 1e6, 2), f"{s.reached}/{s.seeds}" if target is not None else "-",
             pm(s.rounds, 1), pm(s.gb, 4), pm(s.seconds, 1), num(s.startup, 1), num(s.wall, 1),
             f"{s.diverged}/{s.seeds}"]
            for s in stats]
    return table(head, rows)


def ratio_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = ["variant", "vs FedAvg of", "final accuracy", "bytes / round", "rounds to target",
            "GB to target", "seconds to target"]
    return table(head, [[r["variant"], r["against"], num(r["final-accuracy"]), num(r["bytes-per-round"]),
                         num(r["rounds"]), num(r["gb"]), num(r["seconds"])] for r in rows])


REFERENCE = "resist"
"""The method every other is compared with, seed by seed, in the report's paired table."""


def paired_against(groups: dict[tuple[str, str], list[Run]],
                   against: Callable[[str, str], tuple[str, str] | None]) -> list[dict[str, Any]]:
    """Each group against the group ``against(variant, strategy)`` names (None: not compared), paired by
    seed (:func:`simulations.paired_stats.paired`); empty when no pair has two seeds."""
    rows, found = [], []
    for (variant, strategy), runs in groups.items():
        key = against(variant, strategy)
        reference = groups.get(key) if key is not None else None
        if reference is None:
            continue
        found.append(paired({r.seed: r.curve.late_accuracy for r in runs},
                            {r.seed: r.curve.late_accuracy for r in reference}))
        rows.append({"variant": variant, "strategy": strategy, **asdict(found[-1])})
    for row, word in zip(rows, holm(found)):  # the table is the family
        row["holm"] = word
    return rows if any(r["seeds"] >= 2 for r in rows) else []


def paired_rows(groups: dict[tuple[str, str], list[Run]], base: str = MAIN_VARIANT) -> list[dict[str, Any]]:
    """Each method of each variant against ResIST of that variant, or of ``base`` (main, or a grid's first
    cell) when the variant did not run ResIST (an ablation of one method, e.g. DepthFL with FedDyn), as
    :func:`ratios` falls back to FedAvg."""
    def against(variant: str, strategy: str) -> tuple[str, str] | None:
        if strategy == REFERENCE:
            return None
        return (variant, REFERENCE) if (variant, REFERENCE) in groups else (base, REFERENCE)
    return paired_against(groups, against)


def ablation_rows(groups: dict[tuple[str, str], list[Run]], cells: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Each ablation variant of each method against the same method's main variant (what the variant's
    change costs or gains, e.g. ``amp``'s bf16); in a grid (``cells``, its variants) against its first cell,
    which its ablations change."""
    base = cells[0] if cells else MAIN_VARIANT
    return paired_against(groups, lambda variant, strategy: None if variant in (base, *cells)
                          else (base, strategy))


def paired_markdown(rows: Sequence[dict[str, Any]], difference: str, verdict: str) -> list[str]:
    """The rows of a paired comparison as a markdown table (``difference``: what minus what)."""
    family = sum(r["verdict"] != "n/a" for r in rows)
    head = ["variant", "method", "paired seeds", f"mean difference in late accuracy ({difference})",
            f"{LEVEL:.0%} interval (paired t)", "p (paired t)", verdict, f"{verdict}, Holm over {family}"]
    body = [[r["variant"], label(r["strategy"]), str(r["seeds"]), f"{r['mean']:+.4f}",
             "-" if math.isnan(r["low"]) else f"[{r['low']:+.4f}, {r['high']:+.4f}]",
             "-" if math.isnan(r["p"]) else f"{r['p']:.4f}", f"**{r['verdict']}**", f"**{r['holm']}**"]
            for r in rows]
    return table(head, body)


def ablation_lines(rows: Sequence[dict[str, Any]], base: str = MAIN_VARIANT) -> list[str]:
    if not rows:
        return []
    if base == MAIN_VARIANT:
        heading, subject = "## Each variant against the main run of its method", "the variant's late accuracy"
        against = "the same method's main run on that seed"
    else:  # a grid: each ablation changes the grid's first cell
        heading, subject = f"## Each ablation against the grid's first cell ({base}) of its method", \
            "the ablation's late accuracy"
        against = f"the same method's {base} run on that seed (the cell it changes)"
    return [heading, "", *paired_markdown(rows, f"variant - {base}", f"variant vs {base}"), "",
            f"Per seed, {subject} minus {against}; interval and words by the report's paired rule (paired-t 95 % "
            "interval, then Holm over the table; simulations/paired_stats.py).", ""]


def paired_lines(rows: Sequence[dict[str, Any]], without_reference: Sequence[str] = ()) -> list[str]:
    """The paired table and its rule (``without_reference``: variants that did not run ResIST, paired with the
    main comparison's)."""
    fallback = (f" (the variant{'s' if len(without_reference) > 1 else ''} {', '.join(without_reference)} did not "
                "run ResIST: against ResIST of the main comparison)") if without_reference else ""
    return ["## Paired comparison with ResIST", "", *paired_markdown(rows, "method - ResIST", "method vs ResIST"), "",
            "Per seed, the method's late accuracy minus ResIST's on the same seed (same partition, initial "
            f"model and node sampling){fallback}; the interval is mean ± t(0.975, n - 1) x sd / sqrt(n). The word "
            "follows from it alone: **wins** when the whole interval is above 0, **loses** when below, **ties** when "
            "it contains 0, **n/a** with fewer than three paired seeds. The last column corrects for the table's "
            "several comparisons (Holm's step-down on the paired-t p-values, 5 % for the whole table): a win or "
            "a loss that does not survive it is a tie there (simulations/paired_stats.py).", ""]


def paper_lines(paper: dict[str, float], stats: Sequence[GroupStats]) -> list[str]:
    measured = {s.strategy: s for s in stats if s.variant == MAIN_VARIANT}
    rows = []
    for strategy, name in (("resist", "ResIST"), ("fedavg", "FedAvg (paper: local SGD)")):
        if strategy not in paper:
            continue
        s = measured.get(strategy)
        ours = pm(s.final, 2, 100.0) if s else "-"
        diff = num(s.final[0] * 100 - paper[strategy], 2) if s else "-"
        rows.append([name, f"{paper[strategy]:.2f}", ours, diff])
    return ["## Paper vs measured (final test accuracy, %)", "",
            *table(["strategy", "paper", "measured", "measured - paper"], rows), ""]


def failed_lines(manifest: dict[str, Any]) -> list[str]:
    failed = [e for e in manifest.get("runs", []) if e.get("status") == "failed"]
    if not failed:
        return []
    return ["## Failed runs", "", *[f"- `{e['name']}`: {e.get('reason', '')}" for e in failed], ""]


def group_label(variant: str, strategy: str) -> str:
    return label(strategy) + ("" if variant == MAIN_VARIANT else f" ({variant})")


def node_lines(runs_dir: Path, groups: dict[tuple[str, str], list[Run]], bandwidths: Sequence[float],
               target: float | None) -> tuple[list[str], list[Path], dict[str, Any]]:
    """The per-node cost and projected link-time sections (empty when no run wrote ``nodes.jsonl``)."""
    costs = {group_label(v, s): node_summary([runs_dir / r.name for r in runs]) for (v, s), runs in groups.items()}
    costs = {k: v for k, v in costs.items() if v is not None}
    if not costs:
        return [], [], {}
    projections = {group_label(v, s): [p for p in (run_projection(runs_dir / r.name, bandwidths, target)
                                                   for r in runs) if p is not None]
                   for (v, s), runs in groups.items()}  # each run's projected round time and time to target
    projections = {k: v for k, v in projections.items() if v}  # (groups without nodes.jsonl left out)
    lines = ["## Client costs (nodes.jsonl)", "", *node_cost_lines(costs), "",
             "Per node and round: training seconds as the node reported them (a simulated slowdown included, "
             "and shown apart), the step loop's peak memory (the measure is named: `cuda-max-allocated` on a "
             "GPU; `rss-peak-over-start` on a CPU, the resident memory the step loop added), the array bytes it "
             "received and sent, the mean number of partitionable blocks it trained by capacity, and how often a "
             "node trained more blocks than its capacity allows (FedAvg sends every node the full model).", "",
             f"## Projected time at link speeds ({', '.join(f'{b:g}' for b in bandwidths)} Mbit/s)", "",
             *link_time_lines(projections, bandwidths, target), "",
             "Round time = the slowest node's (bytes down + bytes up) x 8 / link speed + its training seconds, "
             "from the measured bytes and seconds; every node has its own link of that speed; server compute "
             "and latency are not included. Time to target: the sum of those round times up to the first "
             "evaluated round at the target accuracy (mean over the seeds that reached it / seeds).", ""]
    plots = [plot_link_times(projections, bandwidths, runs_dir / "accuracy_vs_projected_seconds.png", target)]
    return lines, plots, {"node-costs": costs, "link-times": {
        name: [{str(b): {k: p[b][k] for k in ("round-seconds", "to-target")} for b in bandwidths} for p in runs]
        for name, runs in projections.items()}}


TIERS = {
    "depth": ("## Any-depth accuracy (final round)", "% of the blocks",
              "The global model keeping only the first share of the partitionable blocks (at least one), the "
              "kept blocks scaled as a sub-network of the trained depth would be: what a device that keeps part "
              "of the model gets. 100 % is the full model (equal to `accuracy`)."),
    "exit": ("## Accuracy per exit (final round)", "(exit)",
             "DepthFL's global model predicting with each exit alone (exit 1 after the first stage ... exit 4 "
             "after the last); its `accuracy` is the mean of the four exits' logits, as its authors' test."),
    "width": ("## Accuracy per width tier (final round)", "% of the channels",
              "The global model's first r x C channels of every layer (width-sliced methods: HeteroFL, FedRolex, "
              "FjORD), as HeteroFL and FjORD report what each device class gets; FedRolex trains rolling windows, "
              "so its prefixes are not what its small nodes trained."),
}


LATE_TIERS = {
    "exit": ("### Late accuracy per exit", "The mean over the evaluations in the last fifth of the rounds, as the "
             "comparisons above use, per exit and for the ensemble (`accuracy`, the method's figure). Reading one "
             "exit off this table would pick it on the test set: DepthFL's test is the ensemble."),
}
"""The tier kinds whose section also gives each tier's late accuracy beside the method's: heading and text."""


def tier_lines(runs_dir: Path, groups: dict[tuple[str, str], list[Run]], kind: str) -> list[str]:
    """The report's section on the tiers of ``kind``: final-round accuracy of the global model at each depth
    (``accuracy-depth-<pct>``), width tier (``accuracy-width-<pct>``) or exit (``accuracy-exit-<k>``), mean over
    seeds; for exits also each one's late accuracy beside the ensemble's; empty when no run evaluated such
    tiers."""
    prefix = f"accuracy-{kind}-"
    finals: dict[str, dict[float, list[float]]] = {}
    lates: dict[str, dict[float, list[float]]] = {}
    for (variant, strategy), runs in groups.items():
        name = group_label(variant, strategy)
        for run in runs:
            evaluated = [r for r in read_metrics(runs_dir / run.name) if r.get("accuracy") is not None]
            tiers = {key: value for key, value in (evaluated[-1].items() if evaluated else ())
                     if key.startswith(prefix) and value is not None}
            for key, value in tiers.items():
                percent = float(key[len(prefix):])
                finals.setdefault(name, {}).setdefault(percent, []).append(value)
                if kind in LATE_TIERS:
                    kept = [r for r in evaluated if r.get(key) is not None]
                    lates.setdefault(name, {}).setdefault(percent, []).append(
                        late_accuracy([r["round"] for r in kept], [r[key] for r in kept]))
            if tiers and kind in LATE_TIERS:  # the method's own figure beside its tiers
                lates[name].setdefault(math.inf, []).append(run.curve.late_accuracy)
    percents = sorted({p for by_percent in finals.values() for p in by_percent})
    if not percents:
        return []
    heading, unit, text = TIERS[kind]

    def rows(values: dict[str, dict[float, list[float]]], columns: Sequence[float]) -> list[list[str]]:
        return [[name, *(num(float(np.mean(by[p])), 4) if p in by else "-" for p in columns)]
                for name, by in values.items()]
    lines = [heading, "", *table(["group", *(f"{p:g} {unit}" for p in percents)], rows(finals, percents)), "",
             text, ""]
    if kind in LATE_TIERS:
        late_heading, late_text = LATE_TIERS[kind]
        lines += [late_heading, "", *table(["group", *(f"{p:g} {unit}" for p in percents), "ensemble"],
                                           rows(lates, [*percents, math.inf])), "", late_text, ""]
    return lines


CLIENT_FIGURES = {"mean": "client mean", "worst10": "worst 10 % of clients", "min": "worst client",
                  "std": "spread (std across clients)"}
"""The fairness figures ``client-eval`` records (:mod:`resist_fl.core.client_accuracy`) and their headers."""


def last_client_row(rows: Sequence[Mapping[str, Any]], prefix: str = "client-accuracy-") -> dict[str, float] | None:
    """The client figures (``prefix``: the global model's; ``client-tier-accuracy-``: each node's own
    tier) of the last row that has them (None: the run did not record any)."""
    return next(({f: float(row[f"{prefix}{f}"]) for f in CLIENT_FIGURES} for row in reversed(rows)
                 if row.get(f"{prefix}mean") is not None), None)


def client_lines(runs_dir: Path, groups: Mapping[tuple[str, str], Sequence[Any]],
                 label: Callable[[str, str], str]) -> tuple[list[str], dict[str, Any]]:
    """The per-client section, each figure's mean ± sample std over a group's seeds from each run's last fully
    evaluated round, and its ``report.json`` entry ({} when no run has client figures)."""
    found: dict[str, dict[str, list[float]]] = {}
    for (variant, strategy), runs in groups.items():
        for run in runs:
            rows = read_metrics(Path(runs_dir) / run.name)
            for prefix, suffix in (("client-accuracy-", ""), ("client-tier-accuracy-", ", each node's own tier")):
                figures = last_client_row(rows, prefix)
                if figures is not None:
                    for f in CLIENT_FIGURES:
                        found.setdefault(label(variant, strategy) + suffix, {}).setdefault(f, []).append(figures[f])
    if not found:
        return [], {}

    rows = [[name, str(len(by_figure["mean"])), *(pm(mean_std(by_figure[f])) for f in CLIENT_FIGURES)]
            for name, by_figure in found.items()]
    lines = ["## Per-client accuracy", "", *table(["group", "seeds", *CLIENT_FIGURES.values()], rows)]
    lines += ["", "The global model's accuracy on each client's label distribution's share of the test set "
              "(`client-eval`: the client's label mix weighting the per-label test accuracy), every client of "
              "the split, at the last round evaluated on the whole test set "
              "(\"each node's own tier\": the sub-model the client's node would run at its capacity: a width "
              "method's prefix at the node's width, DepthFL's first stages that fit with their exits, the depth "
              "prefix's first blocks that fit); worst 10 %: mean over the "
              "lowest-scoring tenth of the clients (at least one). Mean ± sample std over seeds.", ""]
    summary = {name: {f: float(np.mean(v)) for f, v in by_figure.items()} for name, by_figure in found.items()}
    return lines, {"clients": summary}


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


def privacy_lines(runs_dir: Path,
                  groups: dict[tuple[str, str], list[Run]]) -> tuple[list[str], list[Path], dict[str, Any]]:
    """The "Privacy" section (a table and the accuracy-vs-epsilon plot), or nothing when no run
    was private and none dealt a block to several nodes."""
    figures = {group_label(v, s): [run_privacy(runs_dir / r.name) for r in runs] for (v, s), runs in groups.items()}
    private = any(f["dp"] != "none" or (f["min-holders-rule"] or 1) > 1 for runs in figures.values() for f in runs)
    if not private:
        return [], [], {}
    header = ["group", "seeds", "dp", "z", "final accuracy", "epsilon (central)", "epsilon, every round (central)",
              "node epsilon (local, max)", "fewest holders", "exposed fraction", "MB / round"]
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
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
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
    return save(fig, path, dpi=110)


def distinct_label_plots(runs_dir: Path) -> list[Path]:
    """One ``label_distribution.png`` per distinct partitioning among the run directories."""
    seen, plots = set(), []
    for path in sorted(Path(runs_dir).glob("*/label_distribution.png")):
        config = path.parent / CONFIG_FILE
        run_config = read_json(config).get("run_config", {}) if config.exists() else {}
        key = tuple(run_config.get(k) for k in ("dataset", "data-path", "partitioner", "dirichlet-alpha",
                                                "shards-per-partition", "seed"))
        if key not in seen or not run_config:
            seen.add(key)
            plots.append(path)
    return plots


def per_run(manifest: dict[str, Any], key: str, shown: str) -> str:
    """How many of the manifest's finished runs recorded each value of ``key`` (``shown``: its format), as
    ``value (n runs); ...`` with ``not recorded`` for runs without it; empty when no run recorded one."""
    counts = Counter(r.get(key) for r in manifest.get("runs", []) if r.get("status") in ("ok", "reused"))
    if not set(counts) - {None}:
        return ""
    return "; ".join(f"{shown.format(value) if value else 'not recorded'} ({count} runs)"
                     for value, count in counts.items())


def render(manifest: dict[str, Any], stats: Sequence[GroupStats], ratio_rows: Sequence[dict[str, Any]],
           target: float | None, target_text: str, plots: Sequence[Path], extra: Sequence[str] = (),
           label_plots: Sequence[Path] = (), paired_table: Sequence[dict[str, Any]] = ()) -> str:
    """The whole ``report.md``."""
    machine = manifest.get("machine") or describe_machine()
    strategies = sorted({s.strategy for s in stats})
    title = "ResIST vs FedAvg" if set(strategies) <= {"resist", "fedavg"} else \
        "ResIST vs " + ", ".join(label(s) for s in strategies if s != "resist")
    lines = [f"# {title}: {manifest.get('preset', 'runs')}", ""]
    if manifest.get("description"):
        lines += [manifest["description"], ""]
    reused = sum(r.get("status") == "reused" for r in manifest.get("runs", []))
    where = " of its last invocation (the runs it reused may have run on another)" if reused else ""
    lines += [f"- Data: {manifest.get('data-label') or 'see the run configs'}",
              f"- Command: `{manifest.get('command', 'unknown (no compare.json)')}`",
              f"- Machine{where}: {machine_line(machine)}"]
    if manifest.get("backend") == "inprocess":
        lines.append("- Backend: the in-process grid (`--backend inprocess`): the real ServerApp and ClientApp in one "
                     "process per run, no SuperLink or Ray, the sampled nodes one after another; s to round 1 and run "
                     "wall s below are that process's")
    if manifest.get("started"):
        runs = manifest.get("runs", [])
        earlier = f"; {reused} of its {len(runs)} runs had finished in earlier invocations and were reused" \
            if reused else ""
        lines.append(f"- Ran: {manifest['started']} to {manifest.get('finished', '?')} (UTC), its last "
                     f"invocation{earlier}")
    codes = per_run(manifest, "code", "`{}`")  # recorded since the runner notes the app's commit of every run
    if codes:
        lines.append(f"- Code, the app's git commit per run: {codes}")
    hosts = per_run(manifest, "machine", "{}")  # and, since later, the machine of every run it launches
    if reused and hosts:
        lines.append(f"- Machine per run: {hosts}")
    lines.append("")
    lines += setup_lines(manifest)
    target_line = (f"Target accuracy: **{target:.4f}** ({target_text})." if target is not None
                   else f"Target accuracy: none ({target_text}).")
    if not stats:
        lines += ["## Results", "", "No reported seeds: this comparison ran its learning-rate grid alone (below).", ""]
    else:
        lines += ["## Results", "", target_line, "", *results_lines(stats, target), "",
                  "Mean ± sample std over seeds; time to target averages the seeds that reached it. "
                  "Seconds are the ServerApp's round times (no server-side evaluation); round 1 includes "
                  "starting the ClientApps (Ray actors, imports, data). s to round 1 is the launcher's time "
                  "from `flwr run` to round 1's metrics (SuperLink, FAB install, Ray, round 1); run wall s "
                  "the whole `flwr run`. Runs diverging: seeds with a round where a node's training went "
                  "non-finite or the mean train loss rose above 5x (and 0.5 nats above) the best earlier round's "
                  "(the ServerApp warns in that round).", ""]
    if ratio_rows:
        lines += ["## ResIST / FedAvg", "", *ratio_lines(ratio_rows), "",
                  "Below 1 means ResIST needs less (or, for accuracy, reaches less).", ""]
    if paired_table:
        lines += paired_lines(paired_table, sorted({s.variant for s in stats} - {s.variant for s in stats
                                                                               if s.strategy == REFERENCE}))
    if manifest.get("paper"):
        lines += paper_lines(manifest["paper"], stats)
    lines += list(extra)
    lines += failed_lines(manifest)
    if stats or plots:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    if label_plots:
        lines += ["## Label distribution", "", "Examples of each label per partition (one partition per node), as "
                  "flwr-datasets' `plot_label_distributions` draws the run's partitioner:", "",
                  *[f"![{p.parent.name}]({p.parent.name}/{p.name})" for p in label_plots], ""]
    return "\n".join(lines)


def with_training_flops(runs_dir: Path, runs: Sequence[Run]) -> list[Run]:
    """``runs`` with their cost curves (read once) and their curves' cumulative training TFLOPs, where their
    nodes' costs were recorded."""
    for run in runs:
        run.costs = cost_curve(runs_dir / run.name)
        if run.costs is not None:
            run.curve = replace(run.curve, tflops=run.costs.flops / 1e12)
    return list(runs)


def equal_cost_section(groups: dict[tuple[str, str], list[Run]]) -> tuple[list[str], dict[str, Any]]:
    """The methods of the main comparison at equal training FLOPs and bytes, and each method's plateau check
    (:mod:`simulations.equal_cost`; nothing when no run recorded its nodes' costs)."""
    curves = {group_label(v, s): [r.costs for r in runs if r.costs is not None]
              for (v, s), runs in groups.items() if v == MAIN_VARIANT}
    return equal_cost_lines(curves, max((int(c.round[-1]) for runs in curves.values() for c in runs if len(c.round)),
                                        default=0))


def build_report(runs_dir: Path, target_accuracy_value: float | None = None,
                 target_fraction: float | None = None, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs into ``runs_dir``; return the report's path."""
    runs_dir = Path(runs_dir)
    if not (runs_dir / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{runs_dir / MANIFEST_FILE}: not found (a report reads the manifest that "
                                "python -m simulations.compare writes beside its runs)")
    manifest = read_json(runs_dir / MANIFEST_FILE)
    groups = group_runs(with_training_flops(runs_dir, [r for r in discover_runs(runs_dir, manifest)
                                                       if not is_tuning(r.variant)]))
    cells = cell_names(manifest.get("grid"))  # a grid's variants; its ablations change the first
    base = cells[0] if cells else MAIN_VARIANT
    target, target_text = preset_target({k: v for k, v in groups.items() if k[0] in cells} if cells else groups,
                                        manifest, target_accuracy_value, target_fraction)
    stats = [group_stats(v, s, runs, target) for (v, s), runs in groups.items()]
    ratio_rows = ratios(stats, base)
    paired_table = paired_rows(groups, base)
    title = f"{manifest.get('preset', runs_dir.name)}: mean ± std over seeds"
    plots = [plot(groups, x, runs_dir / name, title, target) for x, (name, _) in PLOTS.items()
             if any(r.curve.tflops is not None for runs in groups.values() for r in runs) or x != "tflops"] \
        if groups else []
    extra, extra_plots, extra_json = node_lines(runs_dir, groups, bandwidths, target)
    privacy, privacy_plots, privacy_json = privacy_lines(runs_dir, groups)
    clients, clients_json = client_lines(runs_dir, groups, group_label)
    equal, equal_json = equal_cost_section(groups)
    ablations = ablation_rows(groups, cells)
    extra = (ablation_lines(ablations, base) + equal + tuning_lines(manifest, runs_dir)
             + tier_lines(runs_dir, groups, "depth") + tier_lines(runs_dir, groups, "width")
             + tier_lines(runs_dir, groups, "exit") + clients + privacy + extra)
    extra_plots = extra_plots + privacy_plots
    extra_json = {**extra_json, **privacy_json, **clients_json, **({"equal-cost": equal_json} if equal_json else {})}
    write_json(runs_dir / REPORT_JSON, finite({"target": target, "target-rule": target_text,
                                               "groups": [asdict(s) for s in stats], "ratios": ratio_rows,
                                               **({"paired": paired_table} if paired_table else {}),
                                               **({"ablations": ablations} if ablations else {}), **extra_json}))
    path = runs_dir / REPORT_FILE
    label_plots = distinct_label_plots(runs_dir)
    path.write_text(render(manifest, stats, ratio_rows, target, target_text, plots + extra_plots, extra, label_plots,
                           paired_table), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--target-accuracy", type=float, help="absolute target accuracy (0-1)")
    parser.add_argument("--target-fraction", type=float,
                        help=f"target = this x best mean final FedAvg accuracy (default {DEFAULT_TARGET_FRACTION})")
    parser.add_argument("--bandwidth-mbps", type=float, nargs="+", default=list(DEFAULT_BANDWIDTHS),
                        help="link speeds to project round times at (default: 10 100 1000)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"error: {args.runs_dir} is not a directory", file=sys.stderr)
        return 2
    if any(not b > 0 for b in args.bandwidth_mbps):
        parser.error(f"--bandwidth-mbps must be > 0, got {args.bandwidth_mbps}")
    try:
        path = build_report(args.runs_dir, args.target_accuracy, args.target_fraction, args.bandwidth_mbps)
    except FileNotFoundError as error:  # no manifest: not an output directory of simulations.compare
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
