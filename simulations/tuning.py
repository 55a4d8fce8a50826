"""One learning-rate grid for every method: tuning runs, each method's pick, and the report's table.

A preset's ``tuning`` section trains every strategy at every rate on a tuning seed the comparison does not
report (variants ``tune-lr<rate>``); each strategy then runs its reported seeds at the rate of its highest late
accuracy (:func:`simulations.paired_stats.late_accuracy`; ties: the smaller rate). Held-out images
(``validation-size``), another comparison's picks (``picks-from``): simulations/README.md, "Runner".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from resist_fl.run.methods import label
from resist_fl.run.outputs import METRICS_FILE, SUMMARY_FILE, read_json, read_metrics
from simulations.markdown import table
from simulations.paired_stats import late_accuracy

TUNING_PREFIX = "tune-lr"
"""Variant names of the tuning runs: ``tune-lr0.05``."""
PICKS_FROM = "picks-from"
VALIDATION = "validation-size"
ROOT = Path(__file__).resolve().parents[1]


class Grid(NamedTuple):
    """A preset's learning-rate grid: the rates, the tuning seed and rounds, and the training images held out
    to pick on (0: the picks are measured on the test set)."""

    rates: list[float]
    seed: int
    rounds: int
    validation_size: int


def is_tuning(variant: str) -> bool:
    """Whether ``variant`` is a tuning run's."""
    return variant.startswith(TUNING_PREFIX)


def tuning_variant(lr: float) -> str:
    return f"{TUNING_PREFIX}{lr:g}"


def grid_of(tuning: Mapping[str, Any] | None) -> Grid | None:
    """The :class:`Grid` of a preset's ``tuning`` section (None without one); ValueError when it is malformed."""
    if not tuning or reference_of(tuning) is not None:
        return None
    if not {"lr", "seed", "num-server-rounds"} <= set(tuning) <= {"lr", "seed", "num-server-rounds", VALIDATION}:
        raise ValueError(f"tuning = {dict(tuning)!r}: expected the keys lr (a list of rates), seed and "
                         f"num-server-rounds, and optionally {VALIDATION}")
    rates = [float(r) for r in tuning["lr"]]
    if not rates or any(not r > 0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"tuning.lr = {tuning['lr']!r}: expected distinct positive learning rates")
    validation = tuning.get(VALIDATION, 0)
    if isinstance(validation, bool) or not isinstance(validation, int | float) or validation < 0 \
            or validation != int(validation):
        raise ValueError(f"tuning.{VALIDATION} = {validation!r}: expected a whole number of training images "
                         "to hold out (0: pick on the test set)")
    return Grid(sorted(rates), int(tuning["seed"]), int(tuning["num-server-rounds"]), int(validation))


def reference_of(tuning: Mapping[str, Any] | None) -> Path | None:
    """The comparison directory of ``tuning: {picks-from: DIR}`` (None without one); ValueError when the
    section mixes it with a grid's keys."""
    if not tuning or PICKS_FROM not in tuning:
        return None
    if set(tuning) != {PICKS_FROM}:
        raise ValueError(f"tuning = {dict(tuning)!r}: {PICKS_FROM} takes another comparison's picks, so it "
                         "stands alone (no lr, seed or num-server-rounds)")
    path = Path(str(tuning[PICKS_FROM]))
    return path if path.is_absolute() else ROOT / path


def reference_picks(directory: Path, strategies: Sequence[str]) -> dict[str, float]:
    """Each of ``strategies``' pick in the finished comparison ``directory``'s learning-rate grid; ValueError
    when ``directory`` holds no comparison, or its grid lacks a strategy or a finished run at one of its rates."""
    from simulations.report import MANIFEST_FILE  # (the report reads this module)

    if not (directory / MANIFEST_FILE).exists():
        raise ValueError(f"tuning.{PICKS_FROM} = {directory}: no {MANIFEST_FILE} there; run that comparison "
                         "(its tuning runs) first, or give its output directory")
    manifest = read_json(directory / MANIFEST_FILE)
    grid = grid_of(manifest.get("tuning"))
    results = tuning_results(manifest.get("runs", []), directory)
    for strategy in strategies:
        missing = [r for r in (grid.rates if grid else []) if results.get(strategy, {}).get(r) is None]
        if grid is None or strategy not in results or missing:
            raise ValueError(f"tuning.{PICKS_FROM} = {directory}: its learning-rate grid has no finished run of "
                             f"{strategy!r}" + (f" at lr {missing}" if missing and strategy in results else ""))
    return picks({s: results[s] for s in strategies})


def run_late_accuracy(run_dir: Path) -> float | None:
    """A finished run's late accuracy (None when it did not finish or never evaluated)."""
    if not (run_dir / SUMMARY_FILE).exists() or not (run_dir / METRICS_FILE).exists():
        return None
    rows = sorted((r for r in read_metrics(run_dir) if r.get("accuracy") is not None), key=lambda r: r["round"])
    if not rows:
        return None
    return late_accuracy([r["round"] for r in rows], [r["accuracy"] for r in rows])


def picks(results: Mapping[str, Mapping[float, float | None]]) -> dict[str, float]:
    """Per strategy, the rate of its best late accuracy (ties: the smaller rate; unfinished runs never win)."""
    chosen = {}
    for strategy, by_rate in results.items():
        finished = {r: a for r, a in by_rate.items() if a is not None}
        if not finished:
            raise ValueError(f"strategy {strategy!r}: no tuning run finished; nothing to pick a learning rate from")
        chosen[strategy] = min(finished, key=lambda r: (-finished[r], r))
    return chosen


def tuning_results(runs: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, dict[float, float | None]]:
    """Per strategy, each tuning rate's late accuracy, from the manifest's run entries."""
    results: dict[str, dict[float, float | None]] = {}
    for run in runs:
        if is_tuning(run["variant"]):
            rate = float(run["run-config"]["lr"])
            results.setdefault(run["strategy"], {})[rate] = run_late_accuracy(out_dir / run["name"])
    return results


def tuning_lines(manifest: Mapping[str, Any], out_dir: Path) -> list[str]:
    """The report's section on the learning-rate grid ([] without tuning runs); with ``picks-from``, the
    grid of that comparison."""
    reference = reference_of(manifest.get("tuning"))
    if reference is not None:
        from simulations.report import MANIFEST_FILE

        head, *grid = tuning_lines(read_json(reference / MANIFEST_FILE), reference)
        return [head, "", f"This comparison ran no tuning runs: every method runs at its pick in the grid of "
                f"`{manifest['tuning'][PICKS_FROM]}`, below.", *grid]
    results = tuning_results(manifest.get("runs", []), out_dir)
    if not results:
        return []
    tuning = manifest.get("tuning") or {}
    runs = manifest.get("runs", [])
    held = {int(r.get("run-config", {}).get(VALIDATION, 0)) for r in runs if is_tuning(r.get("variant", ""))}
    if len(held) > 1:
        measured_on = (f"and its runs were measured on different images (`{VALIDATION}` "
                       f"{', '.join(map(str, sorted(held)))}; 0: the test set)")
    elif held != {0}:
        measured_on = (f"and its accuracy is measured on {held.pop():,} training images held out of the tuning runs' "
                       f"partitions (`{VALIDATION}`), never on the test set")
    else:
        measured_on = "but its accuracy is measured on the same test set (no validation split)"
    reported = any(not is_tuning(r.get("variant", "")) for r in runs)
    then = ("runs its reported seeds at the rate with the highest late accuracy" if reported else
            "its pick is the rate with the highest late accuracy")
    rates = sorted({r for by_rate in results.values() for r in by_rate})
    chosen = picks(results)
    rows = [[label(strategy), *("-" if by_rate.get(r) is None else
                                (f"**{by_rate[r]:.4f}**" if r == chosen[strategy] else f"{by_rate[r]:.4f}")
                                for r in rates), f"{chosen[strategy]:g}"] for strategy, by_rate in results.items()]
    return ["## Learning-rate grid", "",
            f"Every method trained at every rate of the same grid on tuning seed {tuning.get('seed', '?')} "
            f"({tuning.get('num-server-rounds', '?')} rounds), and {then} (shown; the mean of its evaluations in "
            "the last fifth of its rounds, bold: the pick; ties: the smaller rate). The tuning seed's partitions, "
            f"node samples and initialisation are not the reported seeds', {measured_on}.", "",
            *table(["method", *(f"lr {r:g}" for r in rates), "picked"], rows), ""]
