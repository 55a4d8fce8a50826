"""Fast side-by-side runs in-process: ResIST vs FedAvg over label skew, normalisations and seeds.

Every cell is one whole run of the real ServerApp and ClientApp on the in-process grid
(:mod:`simulations.inprocess`, no SuperLink or Ray start-up), so a grid of cells fits in
minutes on a CPU. It prints one JSON line per run and a table of final accuracy
(mean ± std over seeds) and diverging runs. Example, the non-IID study of
``docs/results/noniid/`` (real digits, 4 nodes)::

    python -m simulations.probe --data digits --alphas 0.3 --norms batchnorm groupnorm \\
        --seeds 0 1 2 --set local-steps=50

Defaults: PreActResNet-101 width 16, 15 rounds of 20 local steps, batch 32, lr 0.05, 4 nodes,
the app's other defaults. ``--set KEY=VALUE`` overrides any run-config key.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "preact_resnet101", "base-width": 16, "num-server-rounds": 15, "local-steps": 20,
        "batch-size": 32, "lr": 0.05}


def app_defaults() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def parse_set(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs, values read as TOML (``lr=0.1``, ``norm='groupnorm'`` or ``norm=groupnorm``)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def data_config(data: str, workdir: Path) -> dict:
    if data == "synthetic":
        return {"dataset": "synthetic"}
    if data == "digits":
        return {"dataset": "digits"}
    return {"dataset": "npz", "data-path": str(Path(data).resolve())}


def run_cell(base: dict, strategy: str, norm: str, alpha: str, seed: int, nodes: int, out: Path) -> dict:
    name = f"{strategy}-{norm}-{alpha}-seed{seed}"
    skew = {"partitioner": "iid"} if alpha == "iid" else {"partitioner": "dirichlet", "dirichlet-alpha": float(alpha)}
    config = {**base, **skew, "strategy": strategy, "norm": norm, "seed": seed, "min-available-nodes": nodes,
              "min-train-nodes": nodes, "output-dir": str(out), "run-name": name}
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


def summary(results: list[dict]) -> list[str]:
    lines = ["| strategy | norm | alpha | seeds | final accuracy | min | runs diverging | MB / round |",
             "|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["strategy"], r["norm"], r["alpha"])  # noqa: E731
    for (strategy, norm, alpha), group in itertools.groupby(sorted(results, key=key), key=key):
        group = list(group)
        acc = [r["final-accuracy"] for r in group]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {strategy} | {norm} | {alpha} | {len(group)} | {statistics.mean(acc):.3f} ± {std:.3f} "
                     f"| {min(acc):.3f} | {sum(bool(r['diverging-rounds']) for r in group)}/{len(group)} "
                     f"| {statistics.mean(r['mb-per-round'] for r in group):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", help="digits | synthetic | /abs/path.npz")
    parser.add_argument("--strategies", nargs="+", default=["resist", "fedavg"])
    parser.add_argument("--norms", nargs="+", default=["batchnorm"])
    parser.add_argument("--alphas", nargs="+", default=["0.3"], help="Dirichlet alphas, or iid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--out", default="", help="directory for the runs (default: a temporary one)")
    parser.add_argument("--jsonl", default="", help="also append the result lines to this file")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="resist-probe-"))
    out.mkdir(parents=True, exist_ok=True)
    base = {**app_defaults(), **BASE, "eval-batch-size": 500, **data_config(args.data, out), **parse_set(args.set)}
    results = []
    for seed, alpha, norm, strategy in itertools.product(args.seeds, args.alphas, args.norms, args.strategies):
        result = run_cell(base, strategy, norm, alpha, seed, args.nodes, out)
        results.append(result)
        line = json.dumps({**result, "set": parse_set(args.set), "data": args.data})
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    print("\n".join(["", *summary(results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
