"""End-to-end round time through ``flwr run``: ResIST's simulated round over FedAvg's, one run each,
same settings, back to back.

PreActResNet-101 at width 16 on synthetic CIFAR-shaped data, 4 SuperNodes (all sampled every
round), CPU. A round's time is the ServerApp's ``round-seconds`` (from sending the training
messages to the merged model; the central evaluation is not included): the median over rounds
2..R is used, round 1 carries the ClientApps' start-up.

    python benchmarks/round_time_benchmark.py [--rounds 4] [--supernodes 4] [--width 16]
                                              [--model preact_resnet101] [--local-steps 10] [--batch-size 32]
                                              [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from resist_fl.run.outputs import read_metrics
from benchmarks.figures_json import write_figures
from simulations.launcher import run_flwr

ROOT = Path(__file__).resolve().parents[1]


def round_seconds(work: Path, strategy: str, args: argparse.Namespace) -> list[float]:
    """``round-seconds`` of each round of one ``flwr run`` of ``strategy``."""
    config = {
        "strategy": strategy, "dataset": "synthetic", "model": args.model, "base-width": args.width,
        "local-steps": args.local_steps, "batch-size": args.batch_size, "num-server-rounds": args.rounds,
        "eval-every": args.rounds, "min-available-nodes": args.supernodes, "min-train-nodes": args.supernodes,
        "output-dir": str(work / "runs"), "run-name": strategy, "partition-cache": str(work / "cache"),
        "amp": False,  # fp32, as the committed figures were measured
    }
    result = run_flwr(ROOT, config, num_supernodes=args.supernodes, timeout_s=args.timeout, workdir=work)
    if not result.success:
        raise SystemExit(f"the {strategy} run failed: {result.reason} (log: {result.log_path})")
    return [row["round-seconds"] for row in read_metrics(result.run_dir)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preact_resnet101")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 carries the start-up and is not used)")
    work = Path(tempfile.mkdtemp(prefix="resist-round-time-"))
    try:
        seconds = {strategy: round_seconds(work, strategy, args) for strategy in ("resist", "fedavg")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    setting = (f"flwr run, {args.model} width {args.width}, {args.supernodes} SuperNodes, {args.local_steps} local "
               f"steps of batch {args.batch_size}, synthetic data, {args.rounds} rounds")
    print(setting)
    steady = {}
    for strategy, values in seconds.items():
        steady[strategy] = statistics.median(values[1:])
        print(f"  {strategy:<7} round seconds {' '.join(f'{v:.4f}' for v in values)}; "
              f"median of rounds 2..{args.rounds}: {steady[strategy]:.4f} s")
    ratio = steady["resist"] / steady["fedavg"]
    print(f"  round time ResIST / FedAvg: {ratio:.3f}")
    write_figures(args.json, setting, seconds=seconds, median=steady, ratio=ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
