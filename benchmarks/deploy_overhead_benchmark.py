"""Deployed round overhead: seconds per round a SuperNode spends outside training, before and
after the cheaper deployed round (lazy imports, the node-local partition cache), side by side.

Each app runs on its own :class:`deploy.local_cluster.LocalCluster` (TLS, SuperNode
authentication, one ``flwr-clientapp`` process per message, as deployed), same settings: a tiny
PreActResNet, synthetic data (or ``--dataset npz --data-path FILE``), 2 SuperNodes, ``--rounds``
rounds. The "before" app is this project at git revision ``--before`` (default: the last commit
before the change), exported to a temporary directory; "after" is the working tree. Overhead of
a round = ``round-seconds`` minus the nodes' mean training seconds (nodes train in parallel):
process start, imports, data load, model build and the messages. Round 1 is shown apart (the
after app fills its partition cache there); the median over rounds 2..R is compared.

    python benchmarks/deploy_overhead_benchmark.py [--before 4b3429b] [--rounds 4] [--supernodes 2]
                                                   [--only-after] [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from benchmarks.figures_json import write_figures
from deploy.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "4b3429b"
"""The last commit before the device-resident batches, lazy imports and the partition cache."""


def export_revision(revision: str, target: Path) -> Path:
    """The project at ``revision``, as files under ``target`` (``git archive``)."""
    target.mkdir(parents=True)
    archive = target.with_suffix(".tar")
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), revision], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    archive.unlink()
    return target


def overheads(app: Path, work: Path, config: dict, supernodes: int) -> list[float]:
    """Per round: ``round-seconds`` minus the mean training seconds of the round's nodes."""
    with LocalCluster(work, supernodes, app_dir=app) as cluster:
        result = cluster.run(config, timeout=1800)
    return [row["round-seconds"] - row["client-seconds"] / row["nodes"] for row in result.metrics]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' app (default {BEFORE})")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--dataset", default="synthetic", choices=("synthetic", "npz"))
    parser.add_argument("--data-path", default="")
    parser.add_argument("--only-after", action="store_true", help="measure the working tree only")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is shown apart)")
    work = Path(tempfile.mkdtemp(prefix="resist-deploy-overhead-"))
    config = {"dataset": args.dataset, "data-path": args.data_path, "stage-depths": "1,1,2,1", "base-width": 8,
              "local-steps": 5, "batch-size": 32, "num-server-rounds": args.rounds, "eval-every": args.rounds,
              "min-available-nodes": args.supernodes, "min-train-nodes": args.supernodes}
    apps = {"after": (ROOT, {**config, "partition-cache": str(work / "partition-cache"),
                          "amp": False})}  # fp32 like "before" (older revisions know no amp="auto")
    if not args.only_after:
        apps = {"before": (export_revision(args.before, work / "before-app"), config), **apps}
    try:
        measured = {name: overheads(app, work / name, cfg, args.supernodes) for name, (app, cfg) in apps.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    setting = (f"deployed (local cluster, TLS + auth), {args.supernodes} SuperNodes, {args.dataset}, tiny "
               f"PreActResNet, {args.rounds} rounds; overhead = round seconds - mean node training seconds")
    print(setting)
    steady, figures = {}, {}
    for name, values in measured.items():
        steady[name] = statistics.median(values[1:])
        figures[name] = {"round1": values[0], "later": values[1:], "median": steady[name]}
        label = f"{name} ({args.before})" if name == "before" else f"{name} (working tree)"
        print(f"  {label:<22} round 1: {values[0]:5.2f} s; rounds 2..{args.rounds}: "
              f"{' '.join(f'{v:.4f}' for v in values[1:])}; median {steady[name]:.4f} s")
    if "before" in steady:
        figures.update(ratio=steady["after"] / steady["before"], saved=steady["before"] - steady["after"])
        print(f"  overhead after / before: {figures['ratio']:.3f} ({figures['saved']:+.2f} s per round saved)")
    write_figures(args.json, setting, **figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
