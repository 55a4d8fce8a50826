"""A short ``flwr run`` of the paper's model with several clients on one GPU (gpu_check.sh step 4).

    python benchmarks/gpu_flwr_run.py OUT_DIR [--clients 4] [--rounds 3] [--device cuda]

Writes the run under ``OUT_DIR/runs/`` and prints its round times and final accuracy; exits 1 if
the run failed. ``--device cpu --model preact_resnet18 --width 4`` is the CPU smoke test.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from resist_fl.run.outputs import read_metrics
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
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
    args = parser.parse_args(argv)
    out = args.out.resolve()
    config = {"model": args.model, "base-width": args.width, "dataset": "synthetic", "num-server-rounds": args.rounds,
              "local-steps": args.local_steps, "batch-size": args.batch_size, "amp": args.device == "cuda",
              "device": args.device, "min-available-nodes": args.clients, "min-train-nodes": args.clients,
              "output-dir": str(out / "runs"), "run-name": f"{args.model}-{args.clients}-clients"}
    gpus = 1 / args.clients if args.device == "cuda" else 0.0
    result = run_flwr(ROOT, config, num_supernodes=args.clients, num_gpus_per_client=gpus, timeout_s=420,
                      workdir=out / "flwr")
    if not result.success:
        print(f"flwr run failed: {result.reason} (log {result.log_path})")
        return 1
    rows = read_metrics(result.run_dir)
    seconds = " ".join(f"{r['round-seconds']:.2f}" for r in rows)
    print(f"{args.model} width {args.width}, {args.clients} clients on one {args.device}, {args.rounds} rounds: "
          f"round seconds {seconds}; "
          f"final accuracy {rows[-1].get('accuracy')}; {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
