"""Start-up: seconds from ``flwr run .`` to the end of round 1, with and without Flower's
runtime dependency installation (which ``uv sync``s the app's dependencies, torch included).

Runs the same one-round simulation (synthetic data, the default model, 2 SuperNodes) three ways,
each isolated by ``simulations.launcher``:

1. ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (the README's path: this environment);
2. runtime installation on, with the machine's uv cache (warm after the first run);
3. with ``--cold``: runtime installation on with an empty, temporary uv cache (a fresh machine:
   downloads torch and its CUDA wheels, several GB).

    python benchmarks/startup_benchmark.py [--cold] [--no-install-only] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from benchmarks.figures_json import write_figures
from simulations.launcher import run_flwr

ROOT = Path(__file__).resolve().parents[1]


QUICK = {"stage-depths": "1,1,2,1", "base-width": 4, "local-steps": 1, "eval-batch-size": 1000}
"""A tiny model and one local step: the start-up alone (the smoke test)."""


def time_to_round1(work: Path, name: str, install: bool, quick: bool = False) -> dict:
    """``round1`` (seconds to round 1, None when never reached), ``whole`` (seconds) and ``status``; prints its line."""
    config = {"dataset": "synthetic", "num-server-rounds": 1, "output-dir": str(work / "runs"), "run-name": name,
              "amp": False, **(QUICK if quick else {})}  # fp32, as the committed figures were measured
    result = run_flwr(ROOT, config, num_supernodes=2, timeout_s=1800, workdir=work,
                      runtime_dependency_installation=install)
    status = "ok" if result.success else f"FAILED: {result.reason}; log: {result.log_path}"
    print(f"{name:<28} to round 1: {result.seconds_to_round1 or float('nan'):6.1f} s, "
          f"whole run: {result.wall_seconds:6.1f} s ({status})")
    return {"round1": result.seconds_to_round1, "whole": result.wall_seconds, "status": status}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="also measure with an empty uv cache")
    parser.add_argument("--no-install-only", action="store_true",
                        help="measure only the run without runtime installation (offline; the smoke test)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and one local step")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="resist-startup-"))
    setting = (f"flwr run . to the end of round 1: 1 round, synthetic data, 2 SuperNodes, "
               f"{'a tiny model and one local step' if args.quick else 'the default model'}")
    print(setting)
    ways = {"no-runtime-install": time_to_round1(work, "no-runtime-install", install=False, quick=args.quick)}
    if not args.no_install_only:
        ways["runtime-install-warm-cache"] = time_to_round1(work, "runtime-install-warm-cache", install=True)
    if args.cold and not args.no_install_only:
        cache = Path(tempfile.mkdtemp(prefix="uv-cache-"))
        os.environ["UV_CACHE_DIR"] = str(cache)
        try:
            ways["runtime-install-cold-cache"] = time_to_round1(work, "runtime-install-cold-cache", install=True)
        finally:
            del os.environ["UV_CACHE_DIR"]
            shutil.rmtree(cache, ignore_errors=True)
    write_figures(args.json, setting, **ways)
    ok = all(way["status"] == "ok" for way in ways.values())
    if ok:
        shutil.rmtree(work, ignore_errors=True)  # a failed run keeps its log (named in its line)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
