"""A short federated run of the paper's model with several clients on one GPU (gpu_check.sh step 4).

    python benchmarks/gpu_flwr_run.py OUT_DIR [--clients 4] [--rounds 3] [--device cuda]
                                      [--strategy resist] [--backend flwr] [--json PATH]

Writes the run under ``OUT_DIR/runs/`` and prints its round times and final accuracy; exits 1 if
the run failed. ``--device cpu --model preact_resnet18 --width 4`` is the CPU smoke test.

``--backend flwr`` (the default) is the real ``flwr run``: Ray places the clients on the GPU at
``1 / clients`` of it each, so they train at the same time. ``--backend inprocess`` runs the same
ServerApp and ClientApp in one process (:mod:`simulations.inprocess`), the clients one after the
other on the GPU; it needs flwr but not Ray (a GPU machine that cannot install Ray can still run
it), and its round time is the sum of the clients' times, not the time of a concurrent round.
``--json PATH`` writes the setting, the backend, torch's version, each round's seconds (in-process: the
sum of the clients' times, not a concurrent round's) and the final accuracy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from resist_fl.run.outputs import read_metrics
from benchmarks.figures_json import write_figures
from simulations.inprocess import run_inprocess_launch
from simulations.launcher import run_flwr

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="preact_resnet101")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--strategy", default="resist")
    parser.add_argument("--backend", choices=("flwr", "inprocess"), default="flwr")
    parser.add_argument("--timeout", type=float, default=420, help="seconds before the run is stopped")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    config = {"model": args.model, "base-width": args.width, "dataset": "synthetic", "num-server-rounds": args.rounds,
              "local-steps": args.local_steps, "batch-size": args.batch_size, "amp": args.device == "cuda",
              "device": args.device, "min-available-nodes": args.clients, "min-train-nodes": args.clients,
              "strategy": args.strategy, "output-dir": str(out / "runs"),
              "run-name": f"{args.model}-{args.strategy}-{args.clients}-clients-{args.backend}"}
    if args.backend == "flwr":
        gpus = 1 / args.clients if args.device == "cuda" else 0.0
        result = run_flwr(ROOT, config, num_supernodes=args.clients, num_gpus_per_client=gpus, timeout_s=args.timeout,
                          workdir=out / "flwr")
    else:
        result = run_inprocess_launch(ROOT, config, num_supernodes=args.clients, timeout_s=args.timeout,
                                      workdir=out / "inprocess")
    if not result.success:
        print(f"{args.backend} run failed: {result.reason} (log {result.log_path})")
        return 1
    rows = read_metrics(result.run_dir)
    seconds = " ".join(f"{r['round-seconds']:.2f}" for r in rows)
    setting = (f"{args.model} width {args.width}, {args.strategy}, {args.clients} clients on one {args.device} "
               f"({args.backend}), {args.rounds} rounds of {args.local_steps} steps at batch {args.batch_size}")
    print(f"{setting}: round seconds {seconds}; final accuracy {rows[-1].get('accuracy')}; {result.run_dir}")
    write_figures(args.json, setting, backend=args.backend, strategy=args.strategy, device=args.device,
                  torch=torch.__version__, round_seconds=[r["round-seconds"] for r in rows],
                  accuracy=rows[-1].get("accuracy"), wall_seconds=result.wall_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
