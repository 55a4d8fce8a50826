"""Figures quoted in the README and docs, written from the committed raw results between markers.

A block in a markdown file::

    <!-- figures: hetero-baselines -->
    ...generated table...
    <!-- end of figures: hetero-baselines -->

is regenerated from committed raw files — a comparison's ``docs/results/<name>/`` (each run's
``metrics.jsonl`` / ``nodes.jsonl`` and ``compare.json``, read as :mod:`simulations.report` reads them),
a label-skew grid's runs (:mod:`simulations.noniid_figures`) or the figures a benchmark wrote with ``--json``
(``docs/performance/*.json``, see :mod:`simulations.benchmark_figures`) — by::

    python -m simulations.figures --write    # every markdown file under README.md and docs/ with a block
    python -m simulations.figures --check    # exit 1 when a block is stale

so a quoted figure and its source cannot disagree (a test runs ``--check``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import BUDGET_TOLERANCE, CostModel
from resist_fl.run.outputs import CONFIG_FILE, read_metrics
from simulations import benchmark_figures, noniid_figures, report
from simulations.equal_cost import PLATEAU_GAIN, cost_curve, plateau
from simulations.node_costs import node_summary
from simulations.paired_stats import paired
from simulations.presets import load_preset
from simulations.tuning import is_tuning, picks, tuning_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end of figures: (?P=name) -->)", re.S)


def _groups(name: str) -> tuple[Path, dict, dict]:
    runs_dir = RESULTS / name
    manifest_path = runs_dir / report.MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: no committed comparison named {name!r}")
    manifest = report.read_json(manifest_path)
    runs = [r for r in report.discover_runs(runs_dir, manifest) if not is_tuning(r.variant)]  # the grid: its own table
    return runs_dir, manifest, report.group_runs(runs)


PAIRED_HEAD = "vs ResIST: paired difference in late accuracy, 95 % interval; with Holm's correction"
LATE_NOTE = ("the mean of each run's evaluations in the last fifth of its rounds (each weighted alike: with "
             "eval-subset, the intermediate ones on the fixed subset and the last on the whole test set), then "
             "mean ± sample std over seeds.")


def _rule(pairs: str) -> str:
    return (f"the report's paired rule on it (method minus ResIST{pairs} per seed, paired-t 95 % interval: wins above "
            "0, loses below, ties across; then Holm's correction over the table's comparisons, which can only turn a "
            "win or a loss into a tie; simulations/paired_stats.py)")


def _verdict(found: dict | None, strategy: str, reference: str) -> str:
    """A method's paired-rule cell: its word, difference and interval, and its word after Holm's correction."""
    if strategy == report.REFERENCE:
        return reference
    if found is None:
        return "-"
    interval = "one seed" if math.isnan(found["low"]) else f"[{found['low']:+.4f}, {found['high']:+.4f}]"
    return f"**{found['verdict']}** ({found['mean']:+.4f}, {interval}); Holm: **{found['holm']}**"


def baselines_block(name: str) -> list[str]:
    """Final accuracy, traffic, time to the preset's target and node-rounds over capacity per method."""
    runs_dir, manifest, groups = _groups(name)
    target, _ = report.preset_target(groups, manifest)
    paired = {(r["variant"], r["strategy"]): r for r in report.paired_rows(groups)}
    rows = []
    for (variant, strategy), runs in groups.items():
        stats = report.group_stats(variant, strategy, runs, target)
        costs = node_summary([runs_dir / r.name for r in runs]) or {}
        rows.append([report.group_label(variant, strategy), report.pm(stats.final), report.pm(stats.late),
                     f"{stats.reached}/{stats.seeds}", report.num(stats.rounds[0], 1),
                     report.num(stats.bytes_per_round / 1e6, 2),
                     f"{costs.get('over-capacity', 0)} / {costs.get('node-rounds', 0)}"])
        if paired:
            rows[-1].append(_verdict(paired.get((variant, strategy)), strategy, "reference (its variant)"))
    rows.sort(key=lambda r: -float(r[2].split(" ")[0]))
    first = report.read_json(runs_dir / next(iter(groups.values()))[0].name / CONFIG_FILE)
    seeds = len(next(iter(groups.values())))
    source = (f"Target accuracy {target:.4f}; {seeds} seed{'s' if seeds != 1 else ''}; "
              f"from [docs/results/{name}](results/{name}/report.md).")
    profile = str(first["run_config"].get("capacity-profile") or "")
    if profile:  # a budget per node: say what ResIST's smallest sub-network costs
        spec, stages, image = _model_of(first)
        costs = CostModel(spec, BlockLayout.from_spec(spec, stages), image)
        capacities = [float(c) for c in profile.split(",")]
        source = (f"Stage depths {'-'.join(map(str, spec.depths))}, partitioned stage(s) {','.join(map(str, stages))}: "
                  f"ResIST's smallest sub-network costs {100 * costs.floor_fraction():.1f} % of the full model's "
                  f"training FLOPs (the smallest budget is {100 * min(capacities):g} %). " + source)
    head = ["method", "final accuracy", "late accuracy", "reached target", "rounds to target", "MB / round",
            "node-rounds over capacity", *([PAIRED_HEAD] if paired else [])]
    note = ["", f"Late accuracy: {LATE_NOTE} The last column is {_rule(' of the same variant')}."] if paired else []
    return [source, "", *report.table(head, rows), *note]


def _model_of(recorded: dict) -> tuple[ModelSpec, tuple[int, ...], tuple[int, ...]]:
    """The model spec, partitioned stages and image size of a run's recorded ``run_config.json``."""
    spec = ModelSpec.from_dict({**recorded["model_spec"], "depths": tuple(recorded["model_spec"]["depths"])})
    stages = tuple(int(s) for s in str(recorded["run_config"]["partitioned-stages"]).split(","))
    return spec, stages, tuple(recorded["data"]["image-shape"][1:])


def floors_block(name: str, third_stage: Sequence[int]) -> list[str]:
    """ResIST's floor (the shared layers and one block, as a fraction of the full model's training FLOPs)
    on the committed study's model and on the same model with a deeper third stage, and the blocks a
    node of each capacity of its profile gets (computed from the model, no run)."""
    runs_dir, _, groups = _main_groups(name)
    recorded = report.read_json(runs_dir / groups[(report.MAIN_VARIANT, "resist")][0].name / CONFIG_FILE)
    spec, stages, image = _model_of(recorded)
    capacities = [float(c) for c in str(recorded["run_config"]["capacity-profile"]).split(",")]
    studied = CostModel(spec, BlockLayout.from_spec(spec, stages), image)
    rows = []
    for depth in sorted({spec.depths[2], *third_stage}):
        deeper = replace(spec, depths=(*spec.depths[:2], depth, *spec.depths[3:]))
        costs = CostModel(deeper, BlockLayout.from_spec(deeper, stages), image)
        floor = costs.floor_fraction()
        rows.append(["-".join(map(str, deeper.depths)) + (" (the study's)" if deeper == spec else ""),
                     f"{100 * floor:.1f} %", f"{costs.full.flops / studied.full.flops:.2f}",
                     *(str(costs.max_depth(c, "flops")) if floor <= c * (1 + BUDGET_TOLERANCE) else "over"
                       for c in capacities)])
    return [f"Computed from the model of [docs/results/{name}](results/{name}/report.md) (base width "
            f"{spec.base_width}, partitioned stage(s) {','.join(map(str, stages))}); FLOPs: the full model's "
            "training FLOPs per sample against the study's. A capacity cell is the most blocks ResIST gives a node "
            "of that capacity, \"over\" where even one block and the shared layers exceed its budget.", "",
            *report.table(["stage depths", "ResIST's floor", "FLOPs vs the study's",
                           *(f"capacity {c:g}" for c in capacities)], rows)]


def plateaus(groups: dict[tuple[str, str], list]) -> tuple[int, dict[tuple[str, str], tuple[float, bool]]]:
    """The groups' last round and each group's plateau check (:func:`simulations.equal_cost.plateau`: its
    last-fifth gain and whether it is below the rule's bound; groups with no window before left out)."""
    rounds = max((int(r.curve.round[-1]) for runs in groups.values() for r in runs), default=0)
    checked = {key: plateau([r.curve for r in runs], rounds) for key, runs in groups.items()}
    return rounds, {key: c for key, c in checked.items() if c is not None}


def _main_groups(name: str) -> tuple[Path, dict, dict]:
    """The comparison's main variant only (its ablations have their own table in the report)."""
    runs_dir, manifest, groups = _groups(name)
    return runs_dir, manifest, {key: runs for key, runs in groups.items() if key[0] == report.MAIN_VARIANT}


WORDS = {"wins": "beat ResIST", "ties": "tie with ResIST", "loses": "lose to ResIST",
         "n/a": "no word yet (fewer than 3 seeds paired with ResIST's)"}


def _budget_ratios(budgets: dict[float, float], over_only: bool) -> str:
    """Budget used per capacity class (``over_only``: the classes over it, by the capacity rule's own slack)."""
    return ", ".join(f"{c:g}: {used:.2f}x" for c, used in budgets.items()
                     if used > 1 + BUDGET_TOLERANCE or not over_only)


def verdicts_block(name: str, results: str = "docs/results") -> list[str]:
    """The study's answer in a few lines (README): how many of its planned main runs have finished, the
    budget ResIST itself used, and each method under the word Holm's correction over the table gives it
    against ResIST, with its paired difference, interval and seeds, and the capacity classes whose budget
    it exceeded (from ``nodes.jsonl``); ``results``: the results folder as the page's links reach it."""
    runs_dir, _, groups = _main_groups(name)
    preset = load_preset(name)
    planned, finished = len(preset.strategies) * len(preset.seeds), sum(len(runs) for runs in groups.values())
    status = (f"All {planned} main runs finished" if finished >= planned else
              f"**Interim: {finished} of the {planned} planned main runs have finished**; the words may change")
    budgets = {strategy: (node_summary([runs_dir / r.name for r in runs]) or {}).get("budget-by-capacity", {})
               for (_, strategy), runs in groups.items()}
    rows = report.paired_rows(groups)
    rounds, checked = plateaus(groups)
    rising = {strategy for (_, strategy), (_, flat) in checked.items() if not flat}
    lines = [f"{status} ([docs/results/{name}]({results}/{name}/report.md)). Each method's late accuracy "
             "minus ResIST's on the same seed: the mean over n paired seeds and its 95 % paired-t interval "
             f"(per comparison); the words hold for the table's {sum(r['verdict'] != 'n/a' for r in rows)} "
             "comparisons together (Holm's correction). Budget used is the training FLOPs sent over the node's "
             "budget, per capacity class (above 1.00x: over it).", "",
             f"- ResIST, the reference, used {_budget_ratios(budgets.get(report.REFERENCE, {}), False) or '-'} of "
             "its budget" + (f"; still rising at round {rounds}" if report.REFERENCE in rising else "") + "."]
    if not rows:
        return [*lines, "- No method has two seeds paired with ResIST's yet: no words."]
    for word in ("wins", "ties", "loses", "n/a"):
        entries = []
        for row in sorted((r for r in rows if r["holm"] == word), key=lambda r: -r["mean"]):
            over = _budget_ratios(budgets.get(row["strategy"], {}), True)
            interval = "" if math.isnan(row["low"]) else f" [{row['low']:+.4f}, {row['high']:+.4f}]"
            alone = f"; {row['verdict']} without the correction" if row["verdict"] != row["holm"] else ""
            entries.append(f"{report.group_label(report.MAIN_VARIANT, row['strategy'])} ({row['mean']:+.4f}"
                           f"{interval}, n = {row['seeds']}{alone}" + (f"; over budget at {over}" if over else "")
                           + (f"; still rising at round {rounds}" if row["strategy"] in rising else "")
                           + ")")
        if entries or word != "n/a":
            lines.append(f"- **{WORDS[word]}**: " + ("; ".join(entries) if entries else "none"))
    return lines


def headline_block(name: str) -> list[str]:
    """The study's headline table: accuracy with the paired rule's verdict against ResIST, the per-client
    figures, the budget each capacity class used, and the bytes and training FLOPs spent."""
    runs_dir, _, groups = _main_groups(name)
    paired = {(r["variant"], r["strategy"]): r for r in report.paired_rows(groups)}
    rounds, checked = plateaus(groups)
    rows = []
    for (variant, strategy), runs in groups.items():
        stats = report.group_stats(variant, strategy, runs, None)
        dirs = [runs_dir / r.name for r in runs]
        clients = [c for c in (report.last_client_row(read_metrics(d)) for d in dirs) if c is not None]
        budgets = (node_summary(dirs) or {}).get("budget-by-capacity", {})
        verdict = _verdict(paired.get((variant, strategy)), strategy, "reference")
        gain, flat = checked.get((variant, strategy), (None, True))
        converged = "-" if gain is None else f"{gain:+.4f} ({'yes' if flat else '**no**'})"
        rows.append([report.group_label(variant, strategy), report.pm(stats.final), report.pm(stats.late), verdict,
                     converged,
                     report.num(float(np.mean([c["mean"] for c in clients])), 4) if clients else "-",
                     report.num(float(np.mean([c["worst10"] for c in clients])), 4) if clients else "-",
                     ", ".join(f"{c:g}: {b:.2f}" for c, b in budgets.items()) or "-",
                     report.num(float(np.mean([r.curve.gb[-1] for r in runs])), 3),
                     report.num(float(np.mean([cost_curve(d).flops[-1] for d in dirs])) / 1e12, 2)])
    rising = [report.group_label(*key) for key, (_, flat) in checked.items() if not flat]
    rows.sort(key=lambda r: -float(r[2].split(" ")[0]))
    seeds = sorted({len(runs) for runs in groups.values()})
    head = ["method", "final accuracy", "late accuracy", PAIRED_HEAD, "last-fifth gain (plateaued)", "client mean",
            "worst 10 % of clients", "budget used by capacity", "GB", "training TFLOPs"]
    return [f"{'/'.join(map(str, seeds))} seeds per method; from [docs/results/{name}](results/{name}/report.md).",
            "", *report.table(head, rows), "",
            "Final accuracy: mean ± sample std over seeds on the 10,000 test images after the last round. Late "
            f"accuracy: {LATE_NOTE} The verdict is {_rule('')}. Last-fifth gain: the mean accuracy over the "
            "last fifth of the rounds minus the fifth before, averaged over seeds; plateaued when below "
            f"{PLATEAU_GAIN} (simulations/equal_cost.py; one seed's gain varies by several points): a method "
            "that has not may gain from longer runs. "
            "Client mean and worst 10 %: the global model on every client's "
            "label mix (client-eval), mean over seeds. Budget used: mean training FLOPs sent over the node's "
            "budget, per capacity class (1.00: all of it). GB: bytes sent and received by the server; training "
            "TFLOPs: the nodes' measured FLOPs per sample of what they were sent x the samples trained, summed over "
            "the run (for FjORD an upper bound: its batches at a smaller drawn width cost less).", "",
            f"Not plateaued by round {rounds}: **{', '.join(rising)}**." if rising else
            f"Every method has plateaued by round {rounds}."]


def _late(name: str) -> dict[str, dict[int, float]]:
    """Each method's late accuracy per seed in the committed comparison ``name`` (its main variant)."""
    return {strategy: {r.seed: r.curve.late_accuracy for r in runs}
            for (_, strategy), runs in _main_groups(name)[2].items()}


def gains_block(first: str, second: str) -> list[str]:
    """Every method's late accuracy in the committed comparison ``second`` minus in ``first`` (main variants,
    the methods both ran), paired by seed over the seeds both ran: what the other schedule changed per method."""
    before, after = _late(first), _late(second)
    rounds = {name: plateaus(_main_groups(name)[2])[0] for name in (first, second)}
    rows = []
    for strategy in (s for s in after if s in before):
        seeds = sorted(set(before[strategy]) & set(after[strategy]))
        found = paired(after[strategy], before[strategy])
        rows.append([report.group_label(report.MAIN_VARIANT, strategy),
                     f"{np.mean([before[strategy][s] for s in seeds]):.4f}",
                     f"{np.mean([after[strategy][s] for s in seeds]):.4f}", f"{found.mean:+.4f}",
                     "-" if math.isnan(found.low) else f"[{found.low:+.4f}, {found.high:+.4f}]",
                     ", ".join(map(str, seeds))])
    head = ["method", f"late accuracy, {rounds[first]} rounds", f"late accuracy, {rounds[second]} rounds",
            "paired difference", "95 % interval (per method)", "seeds"]
    return [f"Each method's late accuracy in `{second}` minus in `{first}` on the seeds both ran (from "
            f"[docs/results/{first}](results/{first}/report.md) and [docs/results/{second}]"
            f"(results/{second}/report.md); an interval needs two seeds).", "", *report.table(head, rows)]


def across_block(first: str, second: str, strategy: str = report.REFERENCE) -> list[str]:
    """One method's late accuracy in the committed comparison ``second`` minus in ``first`` (main variants),
    paired by seed over the seeds both ran, by the report's paired rule."""
    late = {name: _late(name)[strategy] for name in (first, second)}
    seeds = sorted(set(late[first]) & set(late[second]))
    found = paired(late[second], late[first])
    means = [float(np.mean([late[name][s] for s in seeds])) for name in (first, second)]
    return [f"{report.group_label(report.MAIN_VARIANT, strategy)}'s late accuracy on the seeds both ran "
            f"({', '.join(map(str, seeds))}): {means[0]:.4f} in `{first}`, {means[1]:.4f} in `{second}`; paired "
            f"difference {found.mean:+.4f}, 95 % interval [{found.low:+.4f}, {found.high:+.4f}] (from "
            f"[docs/results/{first}](results/{first}/report.md) and "
            f"[docs/results/{second}](results/{second}/report.md))."]


def report_section(name: str, heading: str, columns: Sequence[str] = (), through_first_table: bool = False,
                   rows: Sequence[str] = ()) -> list[str]:
    """The section ``## heading`` of the committed report ``docs/results/<name>/report.md`` (a test rebuilds each
    such report byte for byte from its runs), its table cut to ``columns`` and to the ``rows`` whose first cell is
    one of them when given (or the section up to the end of its first table, ``through_first_table``), under its
    source."""
    path = RESULTS / name / report.REPORT_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    if f"## {heading}" not in lines:
        raise KeyError(f"{path}: no section '## {heading}'")
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = "\n".join(lines[start:end]).strip().splitlines()
    if through_first_table or columns or rows:
        start = next(i for i, line in enumerate(body) if line.startswith("|"))
        end = next((i for i in range(start, len(body)) if not body[i].startswith("|")), len(body))
        body = body[:end]
    if columns or rows:  # its first table alone: the section's notes may speak of what is left out
        table = [[cell.strip() for cell in line.strip("|").split("|")] for line in body[start:end]]
        keep = [table[0].index(c) for c in columns] if columns else range(len(table[0]))  # (a missing one: error)
        kept = [row for row in table[2:] if not rows or row[0] in rows]
        if not kept:
            raise KeyError(f"{path}: section '## {heading}' has no row {', '.join(rows)}")
        body = report.table([table[0][i] for i in keep], [[row[i] for i in keep] for row in kept])
    return [f"From [docs/results/{name}](results/{name}/report.md), its section “{heading}”:", "", *body]


def _tuning(name: str) -> dict[str, dict[float, float | None]]:
    """Per method, each rate's late accuracy in the learning-rate grid of the committed comparison ``name``."""
    runs_dir = RESULTS / name
    return tuning_results(report.read_json(runs_dir / report.MANIFEST_FILE).get("runs", []), runs_dir)


def picks_block(test_set: str, held_out: str) -> list[str]:
    """Each method's learning-rate pick in the grid of the committed comparison ``test_set`` (measured on the
    test set) beside its pick in ``held_out`` (the same grid measured on training images held out), and, where
    they differ, the test-set late accuracy the held-out pick had in the first grid."""
    first, second = _tuning(test_set), _tuning(held_out)
    common = [s for s in first if s in second]
    if not common:
        raise ValueError(f"{test_set} and {held_out}: no method in both learning-rate grids")
    chosen = {name: picks({s: grid[s] for s in common}) for name, grid in ((test_set, first), (held_out, second))}
    rows, same = [], 0
    for strategy in common:
        a, b = chosen[test_set][strategy], chosen[held_out][strategy]
        same += a == b
        at_b = first[strategy].get(b)
        rows.append([report.group_label(report.MAIN_VARIANT, strategy), f"{a:g}", f"{first[strategy][a]:.4f}",
                     f"{b:g}", f"{second[strategy][b]:.4f}", "yes" if a == b else "**no**",
                     "-" if a == b or at_b is None else f"{at_b - first[strategy][a]:+.4f}"])
    head = ["method", "pick on the test set", "its late accuracy", "pick on held-out images", "its late accuracy there",
            "same pick", "test-set late accuracy at the held-out pick, minus at the test-set pick"]
    return [f"From the learning-rate grids of [docs/results/{test_set}](results/{test_set}/report.md) (measured on "
            f"the test set) and [docs/results/{held_out}](results/{held_out}/report.md) (measured on training images "
            f"held out of the tuning runs): {same} of {len(common)} methods pick the same rate.", "",
            *report.table(head, rows)]


def variant_rows_block(name: str, variant: str) -> list[str]:
    """One variant's rows of the committed report ``name``: against ResIST, and against its method's main run."""
    return [*report_section(name, "Paired comparison with ResIST", rows=(variant,)), "",
            *report_section(name, "Each variant against the main run of its method", rows=(variant,))]


def block_type_block(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """ResIST and FedAvg on each (label, committed comparison) pair: final accuracy, their ratio, ResIST's
    first three rounds and its bytes per round against FedAvg's."""
    rows, finals = [], {}
    for label, name in pairs:
        groups = _groups(name)[2]
        resist, fedavg = groups["main", "resist"], groups["main", "fedavg"]
        a, b = (report.mean_std([r.curve.final_accuracy for r in g])[0] for g in (resist, fedavg))
        early = " / ".join(f"{v:.3f}" for v in resist[0].curve.accuracy[:3])
        mb = [report.group_stats("main", s, g, None).bytes_per_round
              for s, g in (("resist", resist), ("fedavg", fedavg))]
        rows.append([label, f"{a:.3f}", f"{b:.3f}", f"{a / b:.3f}", early, f"{mb[0] / mb[1]:.3f}"])
        finals[label] = (a, len(resist))
    (first, (a, seeds)), (second, (b, _)) = finals.items()
    return [*report.table(["model", "ResIST final accuracy", "FedAvg final accuracy", "ResIST / FedAvg",
                           "ResIST accuracy after rounds 1 / 2 / 3", "ResIST bytes / round vs FedAvg"], rows), "",
            f"ResIST's final accuracy, {second} minus {first}: {b - a:+.3f} ({seeds} seed(s); from "
            + ", ".join(f"[docs/results/{n}](results/{n}/report.md)" for _, n in pairs) + ")."]


def round_line_block(name: str, run: str, number: int) -> list[str]:
    """Round ``number`` of a committed run, as the ServerApp's log line prints it (the ETA is not recorded)."""
    row = next(r for r in read_metrics(RESULTS / name / run) if r["round"] == number)
    rounds = len(read_metrics(RESULTS / name / run))
    acc, loss = (("-" if row.get(k) is None else f"{row[k]:.4f}") for k in ("accuracy", "train-loss"))
    return ["```", f"[round {number}/{rounds}] {row['strategy']} acc={acc} train-loss={loss} "
            f"down={row['bytes-down'] / 1e6:.2f} MB up={row['bytes-up'] / 1e6:.2f} MB "
            f"({row['round-seconds']:.1f} s, ETA ... s)", "```"]


def paper_presets_block() -> list[str]:
    """The paper's settings as presets: data, clients, rounds, and the paper's accuracies the report prints beside
    a run's (the presets' ``paper`` key)."""
    rows = []
    for path in sorted((ROOT / "simulations" / "presets").glob("paper-*.yaml")):
        config = load_preset(path.stem)
        rows.append([f"`{path.stem}`", str(config["run-config"]["dataset"]), str(config.federation["num-supernodes"]),
                     str(config["run-config"]["num-server-rounds"]), f"{config.paper.resist:.2f}",
                     f"{config.paper.fedavg:.2f}"])
    return report.table(["preset", "data set", "clients", "rounds", "paper: ResIST %", "paper: local SGD %"], rows)


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "paper-presets": paper_presets_block,
    **{name: partial(baselines_block, name)
       for name in ("hetero-baselines", "hetero-baselines-synthetic", "quick-cpu", "quick-warmup")},
    **{name: partial(headline_block, name)  # the studies' headline tables
       for name in ("fmnist-dirichlet05", "fmnist-study", "fmnist-study-iid", "fmnist-study-within-budget",
                    "fmnist-study-resnet18", "fmnist-study-resnet18-within-budget", "fmnist-study-dynamic",
                    "fmnist-study-long")},
    "fmnist-study-verdicts": lambda: verdicts_block("fmnist-study"),
    "picks-validation": lambda: picks_block("fmnist-study", "fmnist-study-validation"),
    "fmnist-study-ablations": lambda: report_section("fmnist-study", "Each variant against the main run of its method",
                                                     rows=("amp",)),
    **{f"{name}-feddyn": partial(variant_rows_block, name, "feddyn") for name in ("fmnist-study", "fmnist-study-long")},
    **{f"fmnist-study-{variant}": partial(variant_rows_block, "fmnist-study", variant)
       for variant in ("sbn", "layers")},
    "fmnist-study-floors": lambda: floors_block("fmnist-study", (40, 72)),
    "fmnist-study-within-budget-verdicts": lambda: verdicts_block("fmnist-study-within-budget"),
    "within-budget-resist": lambda: across_block("fmnist-study", "fmnist-study-within-budget"),
    "fmnist-study-resnet18-verdicts": lambda: verdicts_block("fmnist-study-resnet18", "results"),
    "fmnist-study-resnet18-equal-cost": lambda: report_section("fmnist-study-resnet18", "Accuracy at equal cost",
                                                               through_first_table=True),
    "fmnist-study-resnet18-within-budget-verdicts": lambda: verdicts_block("fmnist-study-resnet18-within-budget"),
    "within-budget-resist-resnet18": lambda: across_block("fmnist-study-resnet18",
                                                          "fmnist-study-resnet18-within-budget"),
    "fmnist-study-long-verdicts": lambda: verdicts_block("fmnist-study-long", "results"),
    "fmnist-study-long-gains": lambda: gains_block("fmnist-study", "fmnist-study-long"),
    "privacy-digits": lambda: report_section("privacy-digits", "Privacy"),
    "quick-hetero": lambda: [*baselines_block("quick-hetero"), "", *report_section(
        "quick-hetero", "Projected time at link speeds (10, 100, 1000 Mbit/s)"), "",
        *report_section("quick-hetero", "Any-depth accuracy (final round)")],
    "block-type": lambda: block_type_block((("torchvision, post-activation", "quick-torchvision"),
                                            ("pre-activation", "quick-preact64"))),
    "round-line": lambda: round_line_block("quick-warmup", "no-warmup-resist-seed0", 3),
    "performance-summary": benchmark_figures.summary_block,
    "federation-speed": benchmark_figures.federation_speed_block,
    "transport-digits": lambda: report_section("transport-digits", "Results",
                                               ("variant", "strategy", "final accuracy", "MB / round")),
    "noniid-digits": lambda: noniid_figures.grid_block("noniid-digits"),
    "noniid-synthetic": lambda: noniid_figures.grid_block("noniid-synthetic"),
    "probe-l50": lambda: noniid_figures.seeds_table("noniid-digits-l50", noniid_figures.strategy_norm,
                                                    "strategy, norm", noniid_figures.cells_only),
    "remedies-l50": lambda: noniid_figures.remedies_table("noniid-digits-l50",
                                                          "change (ResIST, batchnorm, 50 steps, alpha 0.3)"),
    "fedavg-clip-l50": lambda: noniid_figures.seeds_table(
        "noniid-digits-l50", noniid_figures.strategy_norm, "strategy, norm",
        lambda line: line["strategy"] == "fedavg" and line["variant"] == "clip-1.0"),
    "six-rounds-l50": lambda: noniid_figures.curves_table("noniid-digits-l50-replay"),
    "trace-l50": lambda: noniid_figures.trace_table(noniid_figures.NONIID / "trace-resist-batchnorm-seed1-l50.json"),
    "trace-l50-clip1": lambda: noniid_figures.trace_table(
        noniid_figures.NONIID / "trace-resist-batchnorm-seed1-l50-clip1.json"),
}


def default_files() -> list[str]:
    """README.md and every markdown file under docs/ that holds a figures block."""
    candidates = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [path.relative_to(ROOT).as_posix() for path in candidates
            if BLOCK.search(path.read_text(encoding="utf-8"))]


def render(text: str, blocks: dict[str, Callable[[], list[str]]] = BLOCKS) -> str:
    """``text`` with every figures block regenerated (an unknown block name is an error)."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in blocks:
            raise KeyError(f"figures block {name!r}: expected one of {', '.join(blocks)}")
        return match.group(1) + "\n".join(blocks[name]()) + "\n" + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.figures", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block differs from its source")
    parser.add_argument("files", nargs="*", help="default: README.md and every docs page with a block")
    args = parser.parse_args(argv)
    stale = []
    for name in args.files or default_files():
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(name)
            if args.write:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale figures in {', '.join(stale)}: run python -m simulations.figures --write {' '.join(stale)}",
              file=sys.stderr)
        return 1
    print("\n".join(f"rewrote {n}" for n in stale) if args.write and stale else "figures up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
