"""Label-skew grids: ResIST vs FedAvg over Dirichlet alphas and norms, their table and their plot.

Run through the one runner::

    python -m simulations.compare PRESET [KEY=VALUE ...] [--seeds 0 1 2] [--out DIR] [--dry-run]
    python -m simulations.compare PRESET --report-only --out DIR

``PRESET`` is a preset with a ``grid`` section (``noniid-digits``, ``noniid-synthetic``; see
``presets/_noniid.yaml``). Every cell of strategies x ``grid.norms`` x ``grid.alphas`` x seeds
is one whole run of the real ServerApp and ClientApp on the in-process grid
(:mod:`simulations.inprocess`): the same code ``flwr run`` drives, without a SuperLink per
run, so the 48 cells of a preset fit in one sitting on a CPU. ``KEY=VALUE`` items override
the preset as in :mod:`simulations.compare` (``local-steps=50`` is ``run-config.local-steps=50``).

Writes to ``DIR`` (default ``outputs/noniid/<preset>``): ``results.jsonl`` (one line per cell:
final accuracy, the accuracy / train-loss / cumulative-MB curves, diverging rounds, seconds),
``report.md`` (the table) and ``noniid.png`` (final accuracy and MB-to-target against alpha).
Cells already in ``results.jsonl`` with the same configuration are not run again, so an
interrupted grid resumes where it stopped.

Definitions: final accuracy is the global model's test accuracy after the last round, mean ±
sample std over seeds. The target is ``target.accuracy`` when the preset sets it, otherwise
``target.fraction-of-fedavg`` x FedAvg's mean final accuracy under IID with the grid's first
norm. MB to target: the server's cumulative bytes sent and received (1 MB = 1e6 B) at the first
round whose accuracy reaches the target, averaged over the seeds that reached it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from resist_fl.run.methods import label  # the method table's labels (former names read too)
from resist_fl.run.outputs import read_metrics
from simulations.compare import PROJECT_DIR, expand_overrides
from simulations.inprocess import run_inprocess
from simulations.presets import (
    PresetError,
    app_config_keys,
    coerce_run_config,
    load_preset,
    to_dict,
    validate_preset,
)

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
PLOT_FILE = "noniid.png"
GRID_KEYS = ("norm", "partitioner", "dirichlet-alpha")
"""Run-config keys each cell sets; a preset's run-config must leave them alone."""
SHOWN_DEFAULTS = ("clip-grad-norm", "server-lr", "momentum", "weight-decay", "lr-schedule", "weighting",
                  "min-blocks-per-site", "partitioned-stages", "augment", "inference-scaling")
"""The app defaults a report names (the study's remedies and the optimiser)."""


def load_grid_preset(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """A preset with a valid ``grid`` section, overrides applied.

    Raises
    ------
    PresetError
        The preset has no grid, sets a key the grid owns, or names an unknown norm or a
        non-positive alpha.
    """
    top = list(load_preset(name).keys())
    config = load_preset(name, expand_overrides(overrides, top, list(app_config_keys(PROJECT_DIR))))
    validate_preset(config, PROJECT_DIR)
    grid = config.get("grid")
    if not grid:
        raise PresetError(f"preset {config.name!r} has no grid section; label-skew presets: noniid-digits, "
                          "noniid-synthetic (python -m simulations.compare runs the others)")
    if owned := sorted(set(config.get("run-config", {})) & set(GRID_KEYS)):
        raise PresetError(f"preset {config.name!r}: run-config sets {owned}, which the grid sets per cell "
                          "(use grid.norms / grid.alphas)")
    from resist_fl.core.norms import NORMS

    if bad := sorted(set(grid.norms) - set(NORMS)):
        raise PresetError(f"grid.norms: unknown {bad}; expected some of {', '.join(NORMS)}")
    for alpha in grid.alphas:
        if str(alpha) != "iid" and not _positive(alpha):
            raise PresetError(f"grid.alphas: {alpha!r} is neither 'iid' nor a positive number")
    return config


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def run_settings(config: DictConfig) -> dict[str, Any]:
    """The preset's run-config, values typed as the app's defaults."""
    return coerce_run_config(to_dict(config)["run-config"], app_config_keys(PROJECT_DIR))


def plan(config: DictConfig, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The cells to run, seed-major (a partial grid already covers every setting once)."""
    return [{"strategy": strategy, "norm": norm, "alpha": str(alpha), "seed": int(seed)}
            for seed in (seeds if seeds is not None else config.seeds)
            for alpha in config.grid.alphas for norm in config.grid.norms for strategy in config.strategies]


def cell_key(cell: dict[str, Any]) -> tuple:
    return cell["strategy"], cell["norm"], str(cell["alpha"]), int(cell["seed"])


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def data_config(data: str) -> dict[str, Any]:
    """``grid.data`` as run-config keys: ``digits``, ``synthetic`` or an ``.npz`` path."""
    if data in ("digits", "synthetic"):
        return {"dataset": data}
    return {"dataset": "npz", "data-path": str(Path(data).resolve())}


def run_cell(base: dict[str, Any], strategy: str, norm: str, alpha: str, seed: int, nodes: int,
             out: Path) -> dict[str, Any]:
    """One cell, run in this process on the in-process grid; its result line (curves from ``metrics.jsonl``)."""
    name = f"{strategy}-{norm}-{alpha}-seed{seed}"
    skew = {"partitioner": "iid"} if alpha == "iid" else {"partitioner": "dirichlet", "dirichlet-alpha": float(alpha)}
    config = {**base, **skew, "strategy": strategy, "norm": norm, "seed": seed, "output-dir": str(out),
              "run-name": name}
    started = time.perf_counter()
    run_inprocess(config, num_nodes=nodes)
    rows = read_metrics(out / name)
    effective = json.loads((out / name / "run_config.json").read_text())["run_config"]  # what the run used
    return {"strategy": strategy, "norm": norm, "alpha": alpha, "seed": seed,
            "clip-grad-norm": effective["clip-grad-norm"], "lr": effective["lr"],
            "final-accuracy": rows[-1]["accuracy"], "diverging-rounds": [r["round"] for r in rows if r["diverging"]],
            "accuracy": [r["accuracy"] for r in rows], "train-loss": [r["train-loss"] for r in rows],
            "mb-per-round": sum(r["bytes-down"] + r["bytes-up"] for r in rows) / len(rows) / 1e6,
            "mb-cumulative": [r["cumulative-bytes"] / 1e6 for r in rows],
            "seconds": round(time.perf_counter() - started, 1)}


def run_grid(config: DictConfig, out: Path, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Run the cells not yet in ``out/results.jsonl`` (same configuration); return all results."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    settings = run_settings(config)
    done = {cell_key(r): r for r in read_results(results_path) if r.get("config") == settings}
    cells = plan(config, seeds)
    nodes = int(config.federation["num-supernodes"])
    with tempfile.TemporaryDirectory(prefix="resist-noniid-") as work:
        base = {**app_config_keys(PROJECT_DIR), **settings, **data_config(str(config.grid.data))}
        base.update({"min-available-nodes": nodes, "min-train-nodes": nodes})
        for i, cell in enumerate(cells, 1):
            if cell_key(cell) in done:
                continue
            runs = Path(work) / "runs"
            result = run_cell(base, cell["strategy"], cell["norm"], cell["alpha"], cell["seed"], nodes, runs)
            shutil.rmtree(runs, ignore_errors=True)
            result["config"] = settings
            result["app-defaults"] = {k: v for k, v in base.items() if k not in settings and k not in GRID_KEYS
                                      and k not in ("data-path", "output-dir", "run-name")}
            done[cell_key(cell)] = result
            with open(results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            print(f"[{i}/{len(cells)}] {cell['strategy']} {cell['norm']} alpha={cell['alpha']} seed {cell['seed']}: "
                  f"final accuracy {result['final-accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)
    return [done[k] for k in map(cell_key, cells) if k in done]


# --------------------------------------------------------------------------- the answer


def target_accuracy(config: DictConfig, results: Sequence[dict[str, Any]]) -> float | None:
    """The preset's absolute target, else the fraction of FedAvg's IID accuracy (first norm)."""
    if config.target.get("accuracy") is not None:
        return float(config.target.accuracy)
    iid = [r["final-accuracy"] for r in results
           if r["strategy"] == "fedavg" and r["alpha"] == "iid" and r["norm"] == config.grid.norms[0]]
    return float(config.target["fraction-of-fedavg"]) * statistics.mean(iid) if iid else None


def mb_to_target(result: dict[str, Any], target: float) -> float | None:
    """Cumulative MB at the first round whose accuracy reaches ``target`` (None: never)."""
    for accuracy, mb in zip(result["accuracy"], result["mb-cumulative"]):
        if accuracy is not None and accuracy >= target:
            return mb
    return None


def summarize(results: Sequence[dict[str, Any]], target: float | None,
              order: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One row per (strategy, norm, alpha) in ``order``: accuracy mean/std/min, divergence, MB."""
    rows = []
    for strategy, norm, alpha in order:
        group = [r for r in results if (r["strategy"], r["norm"], r["alpha"]) == (strategy, norm, alpha)]
        if not group:
            continue
        acc = [r["final-accuracy"] for r in group]
        reached = [mb for r in group if target is not None and (mb := mb_to_target(r, target)) is not None]
        rows.append({"strategy": strategy, "norm": norm, "alpha": alpha, "seeds": len(group),
                     "mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "min": min(acc), "diverging": sum(bool(r["diverging-rounds"]) for r in group),
                     "mb-per-round": statistics.mean(r["mb-per-round"] for r in group),
                     "mb-to-target": statistics.mean(reached) if reached else math.nan, "reached": len(reached),
                     "seconds": statistics.mean(r["seconds"] for r in group)})
    return rows


def render(config: DictConfig, rows: Sequence[dict[str, Any]], target: float | None, command: str,
           rows_defaults: dict[str, Any]) -> str:
    lines = [f"# Label skew: ResIST vs FedAvg ({config.name})", "",
             f"{config.description}", "", f"- data: {config['data-label']}",
             f"- nodes: {config.federation['num-supernodes']}, every node trains every round",
             "- run-config: " + ", ".join(f"`{k}={v}`" for k, v in to_dict(config)["run-config"].items()),
             "- the app's defaults for the other keys: " + ", ".join(
                 f"`{k}={v}`" for k, v in rows_defaults.items() if k in SHOWN_DEFAULTS),
             f"- target accuracy: {target:.3f}" if target is not None else "- target accuracy: - (no FedAvg IID run)",
             f"- command: `{command}`", "",
             "| strategy | norm | alpha | seeds | final accuracy | min | runs diverging | MB / round "
             "| MB to target (reached) | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        to_target = "-" if math.isnan(r["mb-to-target"]) else f"{r['mb-to-target']:.0f}"
        lines.append(f"| {label(r['strategy'])} | {r['norm']} | {r['alpha']} | {r['seeds']} "
                     f"| {r['mean']:.3f} ± {r['std']:.3f} | {r['min']:.3f} | {r['diverging']}/{r['seeds']} "
                     f"| {r['mb-per-round']:.1f} | {to_target} ({r['reached']}/{r['seeds']}) | {r['seconds']:.0f} |")
    lines += ["", f"![final accuracy and MB to target against alpha]({PLOT_FILE})", "",
              "alpha is flwr-datasets' Dirichlet concentration over labels per node (smaller: more skew); "
              "iid: an even random split. Final accuracy: mean ± sample std over seeds. MB to target: the "
              "server's cumulative bytes sent and received at the first round reaching the target, mean "
              "over the seeds that reached it. Runs diverging: seeds with a round flagged `diverging`."]
    return "\n".join(lines) + "\n"


def plot(config: DictConfig, rows: Sequence[dict[str, Any]], target: float | None, path: Path) -> Path:
    """Final accuracy (± std) and MB to target against alpha, one line per strategy and norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [str(a) for a in config.grid.alphas]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for strategy in config.strategies:
        for norm in config.grid.norms:
            mine = {r["alpha"]: r for r in rows if (r["strategy"], r["norm"]) == (strategy, norm)}
            xs = [i for i, a in enumerate(alphas) if a in mine]
            if not xs:
                continue
            name = f"{label(strategy)}, {norm}"
            style = "-" if strategy == "resist" else "--"
            mean = [mine[alphas[i]]["mean"] for i in xs]
            std = [mine[alphas[i]]["std"] for i in xs]
            (line,) = left.plot(xs, mean, style, marker="o", label=name)
            left.errorbar(xs, mean, yerr=std, fmt="none", ecolor=line.get_color(), capsize=3)
            right.plot(xs, [mine[alphas[i]]["mb-to-target"] for i in xs], style, marker="o",
                       color=line.get_color(), label=name)
    for ax in (left, right):
        ax.set_xticks(range(len(alphas)), [a if a == "iid" else f"α={a}" for a in alphas])
        ax.set_xlabel("label skew (Dirichlet alpha per node; iid: none)")
        ax.grid(alpha=0.3)
    left.set_ylabel("final test accuracy")
    left.set_title("final accuracy (mean ± std over seeds)", fontsize=10)
    right.set_ylabel("MB to target")
    right.set_title(f"communication to reach {target:.3f}" if target is not None else "MB to target", fontsize=10)
    left.legend(fontsize=8)
    fig.suptitle(f"{config.name}: {config['data-label']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _summary_rows(config: DictConfig, results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], float | None]:
    target = target_accuracy(config, results)
    order = [(s, n, str(a)) for a in config.grid.alphas for n in config.grid.norms for s in config.strategies]
    return summarize(results, target, order), target


def report_text(config: DictConfig, results: Sequence[dict[str, Any]], command: str) -> str:
    """``report.md`` of these results (what ``write_report`` writes, without the plot)."""
    rows, target = _summary_rows(config, results)
    defaults = next((r["app-defaults"] for r in results if "app-defaults" in r), {})
    return render(config, rows, target, command, defaults)


def write_report(config: DictConfig, results: Sequence[dict[str, Any]], out: Path, command: str) -> Path:
    rows, target = _summary_rows(config, results)
    plot(config, rows, target, out / PLOT_FILE)
    (out / REPORT_FILE).write_text(report_text(config, results, command), encoding="utf-8")
    return out / REPORT_FILE


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``python -m simulations.compare GRID-PRESET ...``: run (or with ``--report-only`` rebuild) a grid.

    ``args`` are :func:`simulations.compare.parse_args`'s; a grid runs its cells in this process on
    the in-process grid, one at a time, so ``--backend flwr``, ``--jobs`` and ``--ablations`` are refused.
    """
    try:
        if args.backend not in (None, "inprocess") or args.jobs not in (None, 1) or args.ablations:
            raise PresetError(f"preset {args.preset!r} is a label-skew grid: its cells run on the in-process grid, "
                              "one at a time, without ablations (drop --backend flwr, --jobs, --ablations; vary "
                              "the grid with grid.alphas=[...] grid.norms=[...] or KEY=VALUE)")
        config = load_grid_preset(args.preset, args.overrides)
    except PresetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = (args.out or PROJECT_DIR / "outputs" / "noniid" / config.name).resolve()
    cells = plan(config, args.seeds)
    if args.dry_run:
        for cell in cells:
            print(f"{cell['strategy']} {cell['norm']} alpha={cell['alpha']} seed {cell['seed']}")
        print(f"{len(cells)} cells -> {out}")
        return 0
    command = "python -m simulations.compare " + " ".join(argv)
    if args.report_only:
        settings = run_settings(config)
        wanted = set(map(cell_key, cells))
        results = [r for r in read_results(out / RESULTS_FILE) if r.get("config") == settings and cell_key(r) in wanted]
        if not results:
            print(f"error: {out / RESULTS_FILE} holds no results of this configuration", file=sys.stderr)
            return 1
    else:
        results = run_grid(config, out, args.seeds)
    print(f"report: {write_report(config, results, out, command)}")
    return 0
