"""Load: 100 simulated SuperNodes, 10 sampled per round, 30 rounds, a tiny model.

Runs one ResIST simulation through the real ``flwr run`` (isolated, see
``simulations.launcher``) and prints the ServerApp's resident memory after
round 5 and after round 30 (from ``server-rss-mb`` in ``metrics.jsonl``) and
their ratio (target: within 10 %).

    python benchmarks/load_benchmark.py [--nodes 100] [--sampled 10] [--rounds 30] [--strategy resist]
                                        [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from resist_fl.run.outputs import read_metrics
from benchmarks.figures_json import write_figures
from simulations.launcher import run_flwr

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--strategy", default="resist", choices=("resist", "fedavg"))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be >= 5 (round 5 is the reference)")

    work = Path(tempfile.mkdtemp(prefix="resist-load-"))
    config = {
        "strategy": args.strategy, "dataset": "synthetic", "stage-depths": "1,1,4,1", "base-width": 4,
        "local-steps": 2, "batch-size": 16, "num-server-rounds": args.rounds, "eval-every": 5,
        "eval-batch-size": 500, "fraction-train": args.sampled / args.nodes, "min-train-nodes": args.sampled,
        "min-available-nodes": args.nodes, "output-dir": str(work / "runs"), "run-name": "load",
        "amp": False,  # fp32, as the committed figures were measured
    }
    result = run_flwr(ROOT, config, num_supernodes=args.nodes, timeout_s=args.timeout, workdir=work)
    if not result.success:
        raise SystemExit(f"the run failed: {result.reason} (log: {result.log_path})")
    rows = {r["round"]: r for r in read_metrics(result.run_dir)}
    early, late = rows[5]["server-rss-mb"], rows[args.rounds]["server-rss-mb"]
    setting = (f"{args.nodes} supernodes, {args.sampled} sampled per round, {args.rounds} rounds, {args.strategy}: "
               f"finished in {result.wall_seconds:.0f} s")
    print(setting)
    print(f"nodes per round: {sorted({r['nodes'] for r in rows.values()})}")
    print(f"server RSS after round 5: {early:.1f} MiB; after round {args.rounds}: {late:.1f} MiB; "
          f"ratio {late / early:.3f} (target within 10 %)")
    write_figures(args.json, setting, nodes=args.nodes, sampled=args.sampled, rounds=args.rounds,
                  strategy=args.strategy, wall=result.wall_seconds, rss_early=early, rss_late=late, ratio=late / early)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
