"""Tables written from committed result lines (label-skew grid cells, ``simulations.noniid``'s JSON lines)
and from the divergence traces, for :mod:`simulations.figures`.

A result line is one whole run: strategy, norm, alpha, seed, its final accuracy, the rounds flagged
``diverging``, the curves, the bytes, and the effective ``clip-grad-norm`` / ``lr`` it ran with.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from resist_fl.run.methods import label  # the method table's labels (former names read too)
from simulations import noniid

ROOT = Path(__file__).resolve().parents[1]
NONIID = ROOT / "docs" / "results" / "noniid"
TRANSPORT = ROOT / "docs" / "results" / "transport"


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no committed result lines")
    return noniid.read_results(path)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _mean_std(values: Sequence[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _groups(lines: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(key(line), []).append(line)
    return groups


def _effective(group: Sequence[dict[str, Any]], name: str) -> str:
    values = sorted({str(line[name]) for line in group if name in line})
    if not values:
        raise ValueError(f"{name!r}: these result lines do not record it "
                         "(re-run them with today's simulations.compare GRID-PRESET)")
    return " / ".join(values)


def seeds_table(paths: Path | Sequence[Path], key: Callable[[dict[str, Any]], str], what: str,
                keep: Callable[[dict[str, Any]], bool] = lambda line: True) -> list[str]:
    """Per group: each seed's final accuracy, mean ± std, min, runs diverging, and the effective clip and lr
    (the lines of every file in ``paths`` that ``keep`` accepts, grouped by ``key``)."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    lines = [line for path in paths for line in read_lines(path) if keep(line)]
    rows = [f"| {what} | final accuracy by seed | mean ± std | min | runs diverging | clip-grad-norm | lr |",
            "|---|---|---|---|---|---|---|"]
    for name, group in _groups(lines, key).items():
        group = sorted(group, key=lambda line: line["seed"])
        accuracy = [line["final-accuracy"] for line in group]
        seeds = ", ".join(f"{line['seed']}: {line['final-accuracy']:.3f}" for line in group)
        diverging = sum(bool(line["diverging-rounds"]) for line in group)
        rows.append(f"| {name} | {seeds} | {_mean_std(accuracy)} | {min(accuracy):.3f} | {diverging}/{len(group)} "
                    f"| {_effective(group, 'clip-grad-norm')} | {_effective(group, 'lr')} |")
    return [f"From {', '.join(f'`{_rel(path)}`' for path in paths)}.", "", *rows]


def strategy_norm(line: dict[str, Any]) -> str:
    return f"{label(line['strategy'])}, {line['norm']}"


def change(line: dict[str, Any]) -> str:
    """What a remedies line changed against the unclipped 50-step run (its ``--set`` less ``local-steps`` and
    ``clip-grad-norm=0``); "none" for that run itself."""
    changed = {k: v for k, v in line.get("set", {}).items()
               if k != "local-steps" and not (k == "clip-grad-norm" and not v)}
    return ", ".join(f"`{k}={v}`" for k, v in sorted(changed.items())) or "none (no clipping)"


def resist_batchnorm(line: dict[str, Any]) -> bool:
    return line["strategy"] == "resist" and line["norm"] == "batchnorm"


def curves_table(path: Path) -> list[str]:
    """One row per run: what it set, its train loss per round, the rounds flagged and the final accuracy."""
    rows = ["| run | train loss per round | rounds flagged | final accuracy |", "|---|---|---|---|"]
    for line in read_lines(path):
        losses = " / ".join(f"{v:.2f}" for v in line["train-loss"])
        rows.append(f"| {strategy_norm(line)}, clip-grad-norm {line['clip-grad-norm']} | {losses} "
                    f"| {', '.join(map(str, line['diverging-rounds'])) or '-'} | {line['final-accuracy']:.3f} |")
    return [f"From `{_rel(path)}`.", "", *rows]


TRACE_LINE = re.compile(r"round\s+(\d+) node (\d+): classes (\d+)\s+n=(\d+) blocks=\s*(\d+) loss=\s*([\d.naninf]+) "
                        r"update shared=([\d.naninf]+) own=([\d.naninf]+) max\|bn w\| own=([\d.naninf]+)")


def trace_table(path: Path, recorded: str, rounds: int = 8) -> list[str]:
    """Per round of a trace: each node's loss and its update to the shared layers (relative to their norm),
    and the largest BatchNorm weight any node returned; ``recorded`` says with which code it was recorded."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no committed trace")
    by_round: dict[int, list[tuple]] = {}
    for found in TRACE_LINE.finditer(path.read_text(encoding="utf-8")):
        by_round.setdefault(int(found[1]), []).append(found.groups())
    if not by_round:
        raise ValueError(f"{path}: no trace lines (expected 'round R node K: classes ... loss= ...')")
    rows = ["| round | loss per node 0 / 1 / 2 / 3 | update to the shared layers / their norm, per node "
            "| largest BatchNorm weight returned |", "|---|---|---|---|"]
    for number in sorted(by_round)[:rounds]:
        nodes = sorted(by_round[number], key=lambda g: int(g[1]))
        rows.append(f"| {number} | {' / '.join(f'{float(g[5]):.2f}' for g in nodes)} "
                    f"| {' / '.join(f'{float(g[6]):.2f}' for g in nodes)} | {max(float(g[8]) for g in nodes):.2f} |")
    first = sorted(by_round[min(by_round)], key=lambda g: int(g[1]))
    holds = "; ".join(f"node {g[1]}: classes {g[2]}, {g[4]} blocks" for g in first)
    return [f"From `{_rel(path)}`, recorded {recorded} (round 1: {holds}).", "", *rows]


def grid_block(name: str, folder: str) -> list[str]:
    """The ``simulations.noniid`` grid ``name`` committed in ``docs/results/noniid/<folder>``: final accuracy per
    alpha and (strategy, norm), then the divergence count, the gap to FedAvg and the bytes."""
    config = noniid.load_grid_preset(name)
    path = NONIID / folder / noniid.RESULTS_FILE
    lines = read_lines(path)
    target = noniid.target_accuracy(config, lines)
    columns = [(s, n) for n in config.grid.norms for s in config.strategies]
    alphas = [str(a) for a in config.grid.alphas]
    summary = {(r["strategy"], r["norm"], r["alpha"]): r for r in
               noniid.summarize(lines, target, [(s, n, a) for a in alphas for s, n in columns])}
    rows = ["| alpha | " + " | ".join(f"{label(s)} {n}" for s, n in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
    for alpha in alphas:
        rows.append(f"| {alpha} | " + " | ".join(
            f"{summary[s, n, alpha]['mean']:.3f} ± {summary[s, n, alpha]['std']:.3f}" for s, n in columns) + " |")
    diverging = sum(r["diverging"] for r in summary.values())
    runs = sum(r["seeds"] for r in summary.values())
    norm = config.grid.norms[0]
    gaps = " / ".join(f"{summary['resist', norm, a]['mean'] - summary['fedavg', norm, a]['mean']:+.3f}" for a in alphas)
    mb = {s: statistics.mean(summary[s, n, a]["mb-per-round"] for n in config.grid.norms for a in alphas)
          for s in ("resist", "fedavg")}
    to_target = [summary["resist", n, a]["mb-to-target"] / summary["fedavg", n, a]["mb-to-target"]
                 for n in config.grid.norms for a in alphas
                 if summary["resist", n, a]["reached"] and summary["fedavg", n, a]["reached"]]
    reached = (f"{min(to_target):.2f}-{max(to_target):.2f}x FedAvg's bytes to the target in the {len(to_target)} of "
               f"{len(alphas) * len(config.grid.norms)} cells where both reached it" if to_target
               else "no cell where both reached it")
    seeds = len(lines) // max(1, len(summary))
    return [f"From `{_rel(path)}` ({runs} runs, {seeds} seeds per cell; mean ± sample std).",
            "", *rows, "",
            f"Runs diverging: {diverging} of {runs}. ResIST − FedAvg with {norm}, alpha {' / '.join(alphas)}: "
            f"{gaps}. Bytes per round: ResIST {mb['resist']:.1f} MB, FedAvg {mb['fedavg']:.1f} MB "
            f"({mb['resist'] / mb['fedavg']:.2f}x); target accuracy {target:.3f} "
            f"({config.target.get('fraction-of-fedavg')} x FedAvg's IID accuracy); "
            f"ResIST needed {reached}."]


def transport_block() -> list[str]:
    """Final accuracy and MB per round per strategy and ``transport-dtype`` on the digits lines."""
    path = TRANSPORT / "digits.jsonl"
    lines = read_lines(path)
    dtypes = ["float32", "float16", "uint8"]
    rows = ["| strategy | " + " | ".join(dtypes) + " | MB / round " + " / ".join(dtypes) + " |",
            "|---" * (len(dtypes) + 2) + "|"]
    for strategy in ("resist", "fedavg"):
        cells = {d: [line for line in lines if line["strategy"] == strategy and line["set"]["transport-dtype"] == d]
                 for d in dtypes}
        rows.append(f"| {label(strategy)} | " + " | ".join(_mean_std([c["final-accuracy"] for c in cells[d]])
                                                         for d in dtypes)
                    + " | " + " / ".join(f"{statistics.mean(c['mb-per-round'] for c in cells[d]):.2f}" for d in dtypes)
                    + " |")
    seeds = sorted({line["seed"] for line in lines})
    return [f"From `{_rel(path)}` ({len(seeds)} seeds; final accuracy, mean ± sample std).", "", *rows]
