"""A preset's methods, seeds and ablations through the real ``flwr run`` (or in-process), then plots and a report.

Usage::

    python -m simulations.compare PRESET [KEY=VALUE ...] [--seeds 0 1] [--ablations NAME ...]
                                  [--out DIR] [--jobs N] [--backend flwr|inprocess] [--dry-run]
    python -m simulations.compare PRESET --report-only [--out DIR]
    python -m simulations.compare PRESET --write-run-config FILE.toml [--run NAME]
    python -m simulations.compare --list

``KEY=VALUE`` items are omegaconf dotlist overrides of the preset (a bare app key such as ``lr=0.1`` means
``run-config.lr=0.1``); ablations are names from the preset's ``ablation-variants`` or ``KEY=VALUE``
changes. Every run goes through the preset's backend: :func:`simulations.launcher.run_flwr` (``flwr``) or
:func:`simulations.inprocess.run_inprocess_launch` (``inprocess``). Grids, tuning, reuse, the
output directory and the exit codes: simulations/README.md ("Presets", "Label-skew grids", "Runner").
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resist_fl.run.cli_config import write_run_config
from resist_fl.run.methods import METHODS, method
from resist_fl.run.outputs import CONFIG_FILE, SUMMARY_FILE, write_json
from resist_fl.run.timing import format_seconds
from simulations import report
from simulations.inprocess import run_inprocess_launch
from simulations.label_plot import LABEL_PLOT, write_label_distribution
from simulations.launcher import LaunchResult, federation_config, run_flwr
from simulations.machine import code_version, describe_machine, machine_line
from simulations.tuning import (grid_of, is_tuning, picks, reference_of, reference_picks,
                                tuning_results, tuning_variant)
from simulations.presets import (PresetError, app_config_keys, coerce_run_config, grid_cells, list_presets,
                                 load_preset, to_dict, validate_preset)

PROJECT_DIR = Path(__file__).resolve().parents[1]
MANIFEST_FILE = report.MANIFEST_FILE
MAIN_VARIANT = report.MAIN_VARIANT
Launcher = Callable[..., LaunchResult]
BACKENDS: dict[str, Launcher] = {"flwr": run_flwr, "inprocess": run_inprocess_launch}
"""How a run is launched: ``flwr run`` (the real runtime) or the in-process grid."""


@dataclass(frozen=True)
class PlannedRun:
    """One ``flwr run`` of a comparison."""

    name: str
    variant: str
    strategy: str
    seed: int
    run_config: dict[str, Any]


def expand_overrides(items: Sequence[str], top_level: Sequence[str], app_keys: Sequence[str]) -> list[str]:
    """Prefix bare app keys with ``run-config.`` (``lr=0.1`` -> ``run-config.lr=0.1``)."""
    expanded = []
    for item in items:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        expanded.append(f"run-config.{item}" if head not in top_level and key in app_keys else item)
    return expanded


def parse_assignment(item: str, defaults: dict[str, Any]) -> tuple[str, Any]:
    """``KEY=VALUE`` as a typed run-config pair (type of the app's default)."""
    if "=" not in item:
        raise PresetError(f"ablation {item!r}: expected a name from ablation-variants or KEY=VALUE")
    key = item.split("=", 1)[0]
    if key not in defaults:
        raise PresetError(f"ablation {item!r}: unknown run-config key {key!r}")
    value = OmegaConf.to_container(OmegaConf.from_dotlist([item]))[key]  # type: ignore[index]
    return key, coerce_run_config({key: value}, defaults)[key]


def variants(config: DictConfig, ablations: Sequence[str],
             defaults: dict[str, Any]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """``(variant, strategies, run-config changes)``: the main comparison (a grid preset: each of its
    cells, :func:`simulations.presets.grid_cells`), then each ablation (on a grid: of its first cell)."""
    known = to_dict(config.get("ablation-variants", {}))
    cells = grid_cells(config)
    result = [(variant, list(config.strategies), changes) for variant, changes in cells] \
        or [(MAIN_VARIANT, list(config.strategies), {})]
    base = dict(result[0][2])
    for item in ablations:
        if item in known:
            spec = known[item]
            result.append((item, list(spec.get("strategies", ["resist"])), {**base, **spec.get("run-config", {})}))
        elif "=" in item:
            key, value = parse_assignment(item, defaults)
            result.append((item, list(config.strategies), {**base, key: value}))
        else:
            raise PresetError(f"unknown ablation {item!r}; the preset defines: {', '.join(known)} "
                              "(or give KEY=VALUE)")
    return result


def run_name(variant: str, strategy: str, seed: int) -> str:
    """Directory name of a run: ``<variant>-<strategy>-seed<N>`` with safe characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{variant}-{strategy}-seed{seed}")


def strategy_run_config(config: DictConfig, strategy: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The preset's ``run-config`` with its ``strategy-config`` entry for ``strategy`` over it (keys only
    that method reads, e.g. ResIST's ``allocation``: the others would refuse them)."""
    every = config.get("strategy-config")
    own = to_dict(every).get(strategy, {}) if every else {}
    return coerce_run_config({**to_dict(config["run-config"]), **own}, defaults)


def planned(config: DictConfig, variant: str, strategy: str, seed: int, changes: dict[str, Any], out_dir: Path,
            defaults: dict[str, Any]) -> PlannedRun:
    """One run: the strategy's run config (:func:`strategy_run_config`) with ``changes`` and the runner's keys."""
    name = run_name(variant, strategy, seed)
    return PlannedRun(name, variant, strategy, seed, {**strategy_run_config(config, strategy, defaults), **changes,
                                                      "strategy": strategy, "seed": seed, "run-name": name,
                                                      "output-dir": str(out_dir)})


def plan_tuning(config: DictConfig, out_dir: Path, defaults: dict[str, Any]) -> list[PlannedRun]:
    """The tuning runs of the preset's ``tuning`` grid (:mod:`simulations.tuning`): every strategy at every
    rate, on the tuning seed, for the tuning rounds ([] without a grid)."""
    try:
        grid = grid_of(to_dict(config.tuning) if config.get("tuning") is not None else None)
    except ValueError as err:
        raise PresetError(str(err)) from None
    held = {"validation-size": grid.validation_size} if grid and grid.validation_size else {}
    return [planned(config, tuning_variant(rate), strategy, grid.seed,
                    {"lr": rate, **held, "num-server-rounds": grid.rounds}, out_dir, defaults)
            for rate in (grid.rates if grid else []) for strategy in config.strategies]


def with_picked_rates(plan: Sequence[PlannedRun], rates: dict[str, float]) -> list[PlannedRun]:
    """``plan`` with each strategy's picked learning rate (the tuning runs keep theirs)."""
    return [PlannedRun(r.name, r.variant, r.strategy, r.seed, {**r.run_config, "lr": rates[r.strategy]})
            if r.strategy in rates and not is_tuning(r.variant) else r for r in plan]


def plan_runs(config: DictConfig, seeds: Sequence[int], ablations: Sequence[str], out_dir: Path,
              defaults: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the comparison, seeds outermost so early results cover all variants."""
    plan = [planned(config, variant, strategy, int(seed), coerce_run_config(changes, defaults), out_dir, defaults)
            for seed in seeds for variant, strategies, changes in variants(config, ablations, defaults)
            for strategy in strategies]
    if len({run.name for run in plan}) != len(plan):
        raise PresetError("two runs of the plan share a directory name; check --seeds and --ablations")
    return plan


def differences(run: PlannedRun, saved: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, tuple]:
    """Where a finished run's recorded run config ``saved`` is not what ``run`` would run now, as ``key:
    (saved, wanted)``: every planned key, and every other key ``run``'s method reads at today's default (so a
    changed default is a change; a key the run predates, or one only other methods read, is not compared)."""
    others = set().union(*(m.reads for m in METHODS.values())) - set(method(run.strategy).reads)
    wanted = {**{k: v for k, v in defaults.items() if k in saved and k not in others}, **run.run_config}
    return {k: (saved.get(k), v) for k, v in wanted.items() if k != "output-dir" and saved.get(k) != v}


def reusable(run: PlannedRun, out_dir: Path, defaults: Mapping[str, Any]) -> bool:
    """Whether ``run`` already finished with this configuration (then it is not rerun; ``defaults``: the
    app's run-config defaults, :func:`differences`).

    An unfinished directory is removed (the ServerApp refuses to overwrite a
    run); a finished one with another configuration is an error.
    """
    run_dir = out_dir / run.name
    if not run_dir.exists():
        return False
    if not (run_dir / SUMMARY_FILE).exists() or not (run_dir / CONFIG_FILE).exists():
        print(f"removing unfinished run directory {run_dir}", flush=True)
        shutil.rmtree(run_dir)
        return False
    differs = differences(run, report.read_json(run_dir / CONFIG_FILE).get("run_config", {}), defaults)
    if differs:
        raise PresetError(f"{run_dir} holds a finished run with another configuration "
                          f"(key: (saved, wanted) {differs}); use another --out or delete it")
    return True


class Progress:
    """Prints progress across runs with an ETA from the mean duration of finished launches."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs = total, max(1, jobs)
        self.started, self.done, self.durations = 0, 0, []
        self.lock = threading.Lock()

    def eta(self) -> str:
        remaining = self.total - self.done
        if not self.durations or remaining <= 0:
            return "-" if remaining else "0 s"
        return format_seconds(sum(self.durations) / len(self.durations) * remaining / self.jobs)

    def start(self, run: PlannedRun) -> None:
        with self.lock:
            self.started += 1
            print(f"[start {self.started}/{self.total}] {run.name} (ETA {self.eta()})", flush=True)

    def finish(self, run: PlannedRun, outcome: dict[str, Any]) -> None:
        with self.lock:
            self.done += 1
            if outcome["status"] != "reused":
                self.durations.append(outcome["wall-seconds"])
            detail = (f"reason: {outcome['reason']}" if outcome["status"] == "failed"
                      else f"final accuracy {outcome.get('final-accuracy')}")
            seconds = outcome.get("wall-seconds")
            took = f" in {format_seconds(seconds)}" if seconds is not None else ""
            print(f"[done {self.done}/{self.total}] {outcome['status']} {run.name}{took}; {detail}; "
                  f"ETA {self.eta()}", flush=True)


def portable(value: Any, out_dir: Path) -> Any:
    """``value`` (a manifest entry) with no machine-local path: a path under ``out_dir`` relative to
    it, the flwr executable and this Python by their names; lists and mappings recursively."""
    if isinstance(value, dict):
        return {k: portable(v, out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, out_dir) for v in value]
    if not isinstance(value, str):
        return value
    flwr = str(Path(sys.executable).with_name("flwr"))
    return (value.replace(flwr, "flwr").replace(sys.executable, "python").replace(f"{out_dir}/", "")
            .replace(str(out_dir), "."))


def outcome_of(run: PlannedRun, result: LaunchResult | None, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest entry of one run (``result`` is ``None`` for a reused run)."""
    entry: dict[str, Any] = {"name": run.name, "variant": run.variant, "strategy": run.strategy,
                             "seed": run.seed, "run-config": run.run_config}
    if result is None:
        kept = {k: v for k, v in (previous or {}).items() if k not in entry}
        entry.update({**kept, "status": "reused", "reason": ""})
    else:
        entry.update({"status": "ok" if result.success else "failed", "reason": result.reason,
                      "wall-seconds": result.wall_seconds, "seconds-to-round1": result.seconds_to_round1,
                      "run-id": result.run_id, "flwr-status": result.status, "log": str(result.log_path),
                      "command": shlex.join(result.command)})
    summary = Path(run.run_config["output-dir"]) / run.name / SUMMARY_FILE
    entry["final-accuracy"] = report.read_json(summary).get("final-accuracy") if summary.exists() else None
    return entry


def execute(plan: Sequence[PlannedRun], config: DictConfig, project_dir: Path, out_dir: Path, jobs: int,
            manifest: dict[str, Any], launch: Launcher = run_flwr, *, earlier: Mapping[str, dict[str, Any]],
            done: Mapping[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) every planned run; the manifest is rewritten after each one. ``done``: outcomes of
    this invocation's earlier call (its grid), kept as they are rather than counted as reused; ``earlier``:
    the entries of earlier invocations (read before the first call rewrites the manifest), which a reused
    run keeps. The manifest lists every finished run before the first launch, so that it is whole while
    the new runs train (a snapshot of the output directory then loses none of them)."""
    done = done or {}
    outcomes: dict[str, dict[str, Any]] = {}
    progress = Progress(len(plan), jobs)
    lock = threading.Lock()
    federation = to_dict(config.federation)
    defaults = app_config_keys(project_dir)

    def record(new: Mapping[str, dict[str, Any]]) -> None:
        with lock:
            outcomes.update(new)
            manifest["runs"] = [outcomes[r.name] for r in plan if r.name in outcomes]
            write_json(out_dir / MANIFEST_FILE, manifest)

    settled = {run.name: done[run.name] if run.name in done else
               portable(outcome_of(run, None, earlier.get(run.name)), out_dir)
               for run in plan if run.name in done or reusable(run, out_dir, defaults)}  # errors before any launch
    if settled:
        record(settled)
    code = code_version(project_dir, out_dir)  # a reused run keeps the commit it was recorded with
    host = machine_line(manifest["machine"])  # and the machine it ran on (this invocation's, described once)

    def one(run: PlannedRun) -> None:
        if run.name in settled:
            progress.finish(run, settled[run.name])
            return
        progress.start(run)
        write_label_distribution(run.run_config, federation["num-supernodes"], out_dir / run.name / LABEL_PLOT)
        result = launch(project_dir, run.run_config, num_supernodes=federation["num-supernodes"],
                        num_cpus_per_client=federation["num-cpus-per-client"],
                        num_gpus_per_client=federation["num-gpus-per-client"],
                        timeout_s=float(config["timeout-s"]), workdir=out_dir / "logs")
        outcome = {**outcome_of(run, result, None), "code": code, "machine": host}
        progress.finish(run, outcome)
        record({run.name: portable(outcome, out_dir)})  # what is committed holds no developer's paths

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, plan))  # (re-raises a run's error)
    return [outcomes[run.name] for run in plan]


def write_run_file(config: DictConfig, plan: Sequence[PlannedRun], path: Path, name: str | None = None) -> str:
    """Write the planned run ``name`` (default: the first ResIST run, else the first run) as a run-config file
    for plain ``flwr run``; return the command that runs it with the preset's federation."""
    runs = [run for run in plan if not is_tuning(run.variant)] or list(plan)  # a grid alone: its tuning runs
    run = next((r for r in runs if r.name == name), None) if name else \
        next((r for r in runs if r.strategy == "resist"), runs[0] if runs else None)
    if run is None:
        raise PresetError(f"--run {name!r}: expected one of {', '.join(r.name for r in runs)}")
    federation = config.federation
    resources = federation_config(federation["num-supernodes"], federation["num-cpus-per-client"],
                                  federation["num-gpus-per-client"])
    command = f"flwr run . --stream --run-config {path} --federation-config \"{resources}\""
    lr_note = (["Its lr is the preset's: the runner picks each method's by its tuning grid first."]
               if config.get("tuning") is not None and reference_of(to_dict(config.tuning)) is None else [])
    header = [f"Run {run.name} of preset {config.name}: {config.get('description') or ''}".rstrip(),
              "Written by python -m simulations.compare --write-run-config (the runner's own run config).", *lr_note,
              "Run it with:", f"  {command}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_run_config(run.run_config, path, header="\n".join(header))
    return command


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", help="preset name (see --list) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. federation.num-supernodes=4 lr=0.1")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    parser.add_argument("--ablations", nargs="*", help="ablation names or KEY=VALUE (default: the preset's)")
    parser.add_argument("--out", type=Path, help="results directory (default: outputs/compare/<preset>)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the preset's)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), help="how each run is launched (default: the preset's)")
    parser.add_argument("--project", type=Path, default=PROJECT_DIR, help="the Flower app (default: this repo)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the results in --out")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--write-run-config", type=Path, metavar="FILE",
                        help="write one planned run as a run-config file for plain flwr run, print its command, exit")
    parser.add_argument("--run", help="with --write-run-config: the run's name (default: the first ResIST run)")
    args = parser.parse_intermixed_args(list(argv))
    if not args.list and not args.preset:
        parser.error("a preset is required (see --list)")
    if args.run and not args.write_run_config:
        parser.error(f"--run {args.run}: only read with --write-run-config")
    return args


def resolve(args: argparse.Namespace) -> tuple[DictConfig, list[PlannedRun], Path]:
    """Preset + overrides -> validated config, plan (its tuning runs first, when it has a grid) and
    output directory."""
    defaults = app_config_keys(args.project)
    top_level = list(load_preset(args.preset).keys())
    config = load_preset(args.preset, expand_overrides(args.overrides, top_level, list(defaults)))
    validate_preset(config, args.project)
    out_dir = (args.out or Path("outputs") / "compare" / config.name).expanduser().resolve()
    seeds = args.seeds if args.seeds is not None else list(config.seeds)
    ablations = args.ablations if args.ablations is not None else list(config.ablations)
    plan = plan_tuning(config, out_dir, defaults) + plan_runs(config, seeds, ablations, out_dir, defaults)
    if not plan:
        raise PresetError(f"{config.name}: no runs planned (seeds {list(seeds)} and no learning-rate grid); expected "
                          "at least one seed, or a tuning grid to run alone")
    try:
        reference = reference_of(to_dict(config.tuning) if config.get("tuning") is not None else None)
        if reference is not None:  # another comparison's picks: no tuning runs here
            plan = with_picked_rates(plan, reference_picks(reference, sorted({r.strategy for r in plan})))
    except ValueError as err:
        raise PresetError(str(err)) from None
    return config, plan, out_dir


def new_manifest(config: DictConfig, argv: Sequence[str], out_dir: Path, backend: str = "flwr") -> dict[str, Any]:
    """What the report needs besides the run directories."""
    old = out_dir / MANIFEST_FILE
    previous_runs = report.read_json(old).get("runs", []) if old.exists() else []
    return {"preset": config.name, "description": config.description, "data-label": config["data-label"],
            "paper": to_dict(config.paper) if config.paper is not None else None,
            "tuning": to_dict(config.tuning) if config.get("tuning") is not None else None,
            **({"grid": to_dict(config.grid)} if config.get("grid") else {}),
            "target": to_dict(config.target), "federation": to_dict(config.federation),
            "command": "python -m simulations.compare " + shlex.join(argv).replace(str(out_dir), "<this directory>"),
            "paths": "relative to this directory", "backend": backend,
            "machine": describe_machine(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runs": previous_runs}


def print_failures(outcomes: Sequence[dict[str, Any]]) -> None:
    failed = [o for o in outcomes if o["status"] == "failed"]
    print(f"\n{len(failed)} of {len(outcomes)} runs FAILED:", file=sys.stderr)
    for outcome in failed:
        print(f"  {outcome['name']}: {outcome['reason']} (log: {outcome.get('log')})", file=sys.stderr)


def main(argv: Sequence[str] | None = None, launch: Launcher | None = None) -> int:
    """Run a comparison; 0 when every run finished, 1 when one failed, 2 on a bad preset.

    ``launch`` replaces the backend's launcher (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print("\n".join(list_presets()))
        return 0
    try:
        config, plan, out_dir = resolve(args)
        backend = args.backend or str(config.backend)
        if backend not in BACKENDS:
            raise PresetError(f"backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "inprocess" and float(config.federation["num-gpus-per-client"]):
            raise PresetError(f"federation.num-gpus-per-client = {config.federation['num-gpus-per-client']}: the "
                              "in-process backend does not reserve GPUs; use --backend flwr")
        if args.write_run_config:
            print(write_run_file(config, plan, args.write_run_config, args.run))
            return 0
    except (PresetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.report_only:
        if not (out_dir / MANIFEST_FILE).exists():
            print(f"error: {out_dir / MANIFEST_FILE} does not exist: nothing to report", file=sys.stderr)
            return 1
        print(f"report: {report.build_report(out_dir)}")
        return 0
    launch = launch or BACKENDS[backend]
    jobs = args.jobs or int(config.jobs)
    print(f"{config.name}: {len(plan)} runs ({', '.join(r.name for r in plan)}) -> {out_dir}", flush=True)
    if args.dry_run:
        for run in plan:
            print(f"{run.name}: {run.run_config}")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(config, argv, out_dir, backend)
    earlier = {entry["name"]: entry for entry in manifest["runs"]}  # execute rewrites manifest["runs"]
    try:
        tuning = [r for r in plan if is_tuning(r.variant)]
        if tuning:  # the grid first: each strategy's reported seeds run at its pick
            tuned = execute(tuning, config, args.project.resolve(), out_dir, jobs, manifest, launch, earlier=earlier)
            rates = picks(tuning_results(tuned, out_dir))
            print(f"learning rates picked on the tuning seed: {rates}", flush=True)
            plan = with_picked_rates(plan, rates) if rates else plan
        outcomes = execute(plan, config, args.project.resolve(), out_dir, jobs, manifest, launch,
                           done={o["name"]: o for o in tuned} if tuning else None, earlier=earlier)
    except (PresetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out_dir / MANIFEST_FILE, manifest)
    report_path = report.build_report(out_dir)
    print("\n" + report_path.read_text(encoding="utf-8"))
    print(f"report: {report_path}")
    if any(o["status"] == "failed" for o in outcomes):
        print_failures(outcomes)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
