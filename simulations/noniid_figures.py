"""Tables of the comparisons with a ``grid`` (label skew, transport dtypes; :func:`simulations.presets.grid_cells`)
and of the divergence traces, for :mod:`simulations.figures`.

Each run of a grid comparison (simulations/README.md, "Label-skew grids") is read here as a *line*: its cell
(norm, alpha), its seed, its final accuracy, the rounds its ``metrics.jsonl`` flags ``diverging``, its train loss
per round, and the effective run config (``clip-grad-norm``, ``lr``, ...) from its ``run_config.json``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from resist_fl.run.methods import label  # the method table's labels (former names read too)
from resist_fl.run.outputs import CONFIG_FILE, read_metrics
from simulations import report
from simulations.markdown import mean_std, pm, table
from simulations.presets import alpha_label, cell_names

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
NONIID = RESULTS / "noniid"
SAME_RUN = ("run-name", "output-dir")
"""Run-config keys that name a run rather than change it."""


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def alpha_of(config: dict[str, Any]) -> str:
    """A run's label skew as its grid cell names it (:func:`simulations.presets.alpha_label`)."""
    return alpha_label("iid" if config["partitioner"] == "iid" else config["dirichlet-alpha"])


def grid_lines(name: str) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """The committed comparison ``docs/results/<name>``: its directory, manifest and one line per finished run."""
    runs_dir = RESULTS / name
    if not (runs_dir / report.MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{runs_dir / report.MANIFEST_FILE}: no committed comparison named {name!r}")
    manifest = report.read_json(runs_dir / report.MANIFEST_FILE)
    cells = set(cell_names(manifest.get("grid")))
    lines = []
    for run in report.discover_runs(runs_dir, manifest):
        config = report.read_json(runs_dir / run.name / CONFIG_FILE)["run_config"]
        rows = read_metrics(runs_dir / run.name)
        lines.append({"name": run.name, "variant": run.variant, "strategy": run.strategy, "seed": run.seed,
                      "norm": config["norm"], "alpha": alpha_of(config), "cell": run.variant in cells,
                      "config": config, "run": run,
                      "final-accuracy": run.curve.final_accuracy,
                      "diverging-rounds": [r["round"] for r in rows if r.get("diverging")],
                      "train-loss": [r["train-loss"] for r in rows]})
    return runs_dir, manifest, lines


def _groups(lines: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(key(line), []).append(line)
    return groups


def seeds_table(name: str, key: Callable[[dict[str, Any]], str], what: str,
                keep: Callable[[dict[str, Any]], bool] = lambda line: True) -> list[str]:
    """Per group of the runs ``keep`` accepts, grouped by ``key`` (a group's runs should differ only in their
    seed: with :func:`strategy_norm`, a grid of one alpha): each seed's final accuracy, mean ± std, min, runs
    diverging, and the effective clip norm and lr."""
    runs_dir, _, lines = grid_lines(name)
    return _seeds_rows(runs_dir, lines, key, what, keep)


def _seeds_rows(runs_dir: Path, lines: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str], what: str,
                keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    """:func:`seeds_table` of lines already read."""
    rows = []
    for group_name, group in _groups([line for line in lines if keep(line)], key).items():
        group = sorted(group, key=lambda line: line["seed"])
        accuracy = [line["final-accuracy"] for line in group]
        seeds = ", ".join(f"{line['seed']}: {line['final-accuracy']:.3f}" for line in group)
        diverging = sum(bool(line["diverging-rounds"]) for line in group)
        clip, lr = (" / ".join(sorted({str(line["config"][k]) for line in group})) for k in ("clip-grad-norm", "lr"))
        rows.append([group_name, seeds, pm(mean_std(accuracy), 3), f"{min(accuracy):.3f}", f"{diverging}/{len(group)}",
                     clip, lr])
    head = [what, "final accuracy by seed", "mean ± std", "min", "runs diverging", "clip-grad-norm", "lr"]
    return [f"From the runs in `{_rel(runs_dir)}/`.", "", *table(head, rows)]


def strategy_norm(line: dict[str, Any]) -> str:
    return f"{label(line['strategy'])}, {line['norm']}"


def cells_only(line: dict[str, Any]) -> bool:
    """A run of one of the grid's cells (not of an ablation)."""
    return line["cell"]


def change(lines: Sequence[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """What a run changed against the first cell's run of its strategy and seed (its run config's
    differences; the ablations are of that cell); "none" for that run itself."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for line in lines:
        if cells_only(line):
            cells.setdefault((line["strategy"], line["seed"]), line["config"])

    def key(line: dict[str, Any]) -> str:
        base = cells[line["strategy"], line["seed"]]
        changed = {k: v for k, v in line["config"].items() if k not in SAME_RUN and base.get(k) != v}
        return ", ".join(f"`{k}={v}`" for k, v in sorted(changed.items())) or "none (the first cell)"
    return key


def remedies_table(name: str, what: str) -> list[str]:
    """ResIST, BatchNorm, the first cell and each of its ablations, one row per change."""
    runs_dir, _, lines = grid_lines(name)  # read once: the change of a run is against the lines' first cell
    return _seeds_rows(runs_dir, lines, change(lines), what, lambda line: line["strategy"] == "resist"
                       and line["norm"] == "batchnorm")


def curves_table(name: str) -> list[str]:
    """One row per run: its strategy, norm and clip norm, its train loss per round, the rounds flagged, the
    final accuracy."""
    runs_dir, _, lines = grid_lines(name)
    rows = [[f"{strategy_norm(line)}, clip-grad-norm {line['config']['clip-grad-norm']}",
             " / ".join(f"{v:.2f}" for v in line["train-loss"]), ", ".join(map(str, line["diverging-rounds"])) or "-",
             f"{line['final-accuracy']:.3f}"] for line in lines]
    head = ["run", "train loss per round", "rounds flagged", "final accuracy"]
    return [f"From the runs in `{_rel(runs_dir)}/`.", "", *table(head, rows)]


def grid_block(name: str) -> list[str]:
    """The grid comparison ``name``: final accuracy per alpha and (strategy, norm), then the runs that
    diverged, the gap to FedAvg, the bytes, and the bytes to the report's target."""
    runs_dir, manifest, lines = grid_lines(name)
    lines = [line for line in lines if cells_only(line)]
    strategies = list(dict.fromkeys(line["strategy"] for line in lines))
    norms = [str(n) for n in manifest["grid"]["norms"]]
    alphas = [alpha_label(a) for a in manifest["grid"]["alphas"]]
    cell = _groups(lines, lambda line: f"{line['strategy']} {line['norm']} {line['alpha']}")
    groups = report.group_runs([line["run"] for line in lines])  # the cells' runs
    target, target_text = report.preset_target(groups, manifest)
    words = [row["verdict"] for row in report.paired_rows(groups) if row["strategy"] == "fedavg"]
    verdicts = (", ".join(f"{word} in {words.count(word)}" for word in dict.fromkeys(words)) + f" of {len(words)} "
                "cells") if words else "no cell with two paired seeds"
    columns = [(s, n) for n in norms for s in strategies]
    rows = table(["alpha", *(f"{label(s)} {n}" for s, n in columns)],
                 [[alpha, *(pm(mean_std([line["final-accuracy"] for line in cell[f"{s} {n} {alpha}"]]), 3)
                            for s, n in columns)] for alpha in alphas])

    def final(strategy: str, alpha: str) -> float:  # mean final accuracy of a cell of the first norm
        return statistics.mean(line["final-accuracy"] for line in cell[f"{strategy} {norms[0]} {alpha}"])

    gaps = " / ".join(f"{final('resist', a) - final('fedavg', a):+.3f}" for a in alphas)
    mb = {s: statistics.mean(line["run"].curve.bytes_per_round / 1e6 for line in lines if line["strategy"] == s)
          for s in ("resist", "fedavg")}
    to_target = []
    for norm in norms:
        for alpha in alphas:
            hits = {s: [h["gb"] for line in cell[f"{s} {norm} {alpha}"]
                        if (h := line["run"].curve.to_target(target)) is not None] for s in ("resist", "fedavg")}
            if all(hits.values()):
                to_target.append(statistics.mean(hits["resist"]) / statistics.mean(hits["fedavg"]))
    reached = (f"{min(to_target):.2f}-{max(to_target):.2f}x FedAvg's bytes to the target in the {len(to_target)} "
               f"of {len(alphas) * len(norms)} cells where both reached it (in at least one seed)" if to_target
               else "no cell where both reached it")
    seeds = len({line["seed"] for line in lines})
    diverging = sum(bool(line["diverging-rounds"]) for line in lines)
    return [f"From the runs in `{_rel(runs_dir)}/` ({len(lines)} runs, {seeds} seeds per cell; mean ± sample std).",
            "", *rows, "",
            f"Runs diverging: {diverging} of {len(lines)}. FedAvg vs ResIST by the report's paired rule (late "
            f"accuracy, paired-t 95 % interval, per cell): {verdicts}. ResIST − FedAvg "
            f"(final accuracy) with {norms[0]}, alpha "
            f"{' / '.join(alphas)}: {gaps}. Bytes per round: ResIST {mb['resist']:.1f} MB, FedAvg "
            f"{mb['fedavg']:.1f} MB ({mb['resist'] / mb['fedavg']:.2f}x); target accuracy {target:.3f} "
            f"({target_text}); ResIST needed {reached}."]


def trace_table(path: Path, rounds: int = 8) -> list[str]:
    """Per round of a committed trace (``docs/results/noniid/trace_divergence.py``'s lines as JSON): each node's
    loss and its update to the shared layers (relative to their norm), and the largest BatchNorm weight any node
    returned; the file's ``recorded`` says with which code it was recorded."""
    trace = report.read_json(path)
    by_round: dict[int, list[dict[str, Any]]] = {}
    for row in sorted(trace["rows"], key=lambda r: (r["round"], r["node"])):
        by_round.setdefault(row["round"], []).append(row)
    if not by_round:
        raise ValueError(f"{path}: no trace rows")
    rows = []
    for number in sorted(by_round)[:rounds]:
        nodes = by_round[number]
        per_node = [" / ".join(f"{r[key]:.2f}" for r in nodes) for key in ("loss", "update-shared")]
        rows.append([str(number), *per_node, f"{max(r['max-bn-weight-own'] for r in nodes):.2f}"])
    rows = table(["round", "loss per node 0 / 1 / 2 / 3", "update to the shared layers / their norm, per node",
                  "largest BatchNorm weight returned"], rows)
    first = by_round[min(by_round)]
    holds = "; ".join(f"node {r['node']}: classes {r['classes']}, {r['blocks']} blocks" for r in first)
    return [f"From `{_rel(path)}`, recorded {trace['recorded']} (round 1: {holds}).", "", *rows]
