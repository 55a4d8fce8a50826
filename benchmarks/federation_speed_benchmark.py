"""Speed of a 100-node Fashion-MNIST federation through the real ``flwr run``, beside the same local
steps timed outside Flower, in one run.

Inside: one ``flwr run`` (FedAvg, so every sampled node trains the same model) of ``--supernodes``
SuperNodes of which ``--fraction`` train each round; from its ``metrics.jsonl`` / ``nodes.jsonl``:
start-up (launch to round 1's row), each round's seconds (messages out to merged model), the
server's evaluation seconds, the sum of the sampled nodes' training seconds, and a node's seconds per
local step (``train-seconds`` / local steps, rounds 2..R: round 1 carries the actors' start-up).
Outside: the project's ``train()`` on one node's partition with the same model, batch and steps, with
1 torch thread (what a Ray actor with ``client-resources-num-cpus=1`` gets: ``OMP_NUM_THREADS=1``)
and with every core, and a bare PyTorch loop on one fixed batch (1 thread). Printed side by side with
the ratios, and written as JSON (``--json``) for the docs' renderer.

    python benchmarks/federation_speed_benchmark.py [--supernodes 100] [--fraction 0.1] [--rounds 4]
        [--model preact_resnet18] [--width 16] [--local-steps 20] [--batch-size 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from resist_fl.data import TrainBatches, load_partition, normalization  # noqa: E402
from resist_fl.node.training import train  # noqa: E402
from resist_fl.run.outputs import NODES_FILE, read_metrics  # noqa: E402
from resist_fl.run.settings import RunSettings, resolve_model  # noqa: E402
from resist_fl.core.model import build_model  # noqa: E402
from simulations.launcher import run_flwr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACTORS = os.cpu_count() or 1
"""Ray actors training at once: one per core (client-resources-num-cpus = 1)."""


def run_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {"strategy": "fedavg", "dataset": args.dataset, "model": args.model, "base-width": args.width,
            "local-steps": args.local_steps, "batch-size": args.batch_size, "num-server-rounds": args.rounds,
            "fraction-train": args.fraction, "min-train-nodes": max(1, round(args.fraction * args.supernodes)),
            "min-available-nodes": args.supernodes, "partitioner": "iid", "augment": "none",
            "eval-subset": args.eval_subset, "eval-batch-size": 1000, "output-dir": str(out), "run-name": "speed",
            "amp": False}  # fp32, as the outside half trains (amp="auto" would pick bf16 on a bf16 CPU)


def inside(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One flwr run's figures (see the module docstring)."""
    config = run_config(args, work / "runs")
    result = run_flwr(ROOT, config, num_supernodes=args.supernodes, timeout_s=3600, workdir=work / "logs")
    if not result.success:
        raise SystemExit(f"flwr run failed: {result.reason}\n{result.log_path.read_text()[-3000:]}")
    rows, nodes = read_metrics(result.run_dir), read_metrics(result.run_dir, NODES_FILE)
    later = [r for r in rows if r["round"] > 1]
    node_seconds = {r["round"]: sum(n["train-seconds"] for n in nodes if n["round"] == r["round"]) for r in rows}
    step = [n["train-seconds"] / args.local_steps for n in nodes if n["round"] > 1]
    return {"wall-seconds": result.wall_seconds, "startup-seconds": result.seconds_to_round1,
            "round-seconds": [r["round-seconds"] for r in rows], "eval-seconds": [r.get("eval-seconds") for r in rows],
            "node-train-seconds": [node_seconds[r["round"]] for r in rows],
            "nodes-per-round": statistics.mean(sum(n["round"] == r["round"] for n in nodes) for r in rows),
            "round-minus-training": statistics.median(r["round-seconds"] - node_seconds[r["round"]] / ACTORS
                                                      for r in later),
            "step-ms": 1000 * statistics.median(step)}


def outside(args: argparse.Namespace, threads: int) -> float:
    """Median ms per step of the project's ``train()`` on partition 0 with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    settings = RunSettings.from_run_config({"dataset": args.dataset, "model": args.model, "base-width": args.width})
    spec, _ = resolve_model(settings)
    part = load_partition(args.dataset, 0, args.supernodes, partitioner="iid", seed=0)
    loader = TrainBatches(part, args.batch_size, normalization=normalization(args.dataset), augment="none", seed=0,
                          crop_size=settings.crop_size())
    times = []
    for repeat in range(args.repeats + 1):  # the first: warm-up
        model = build_model(spec)  # a fresh model per message, as a node builds one
        result = train(model, loader, steps=args.local_steps, lr=0.05, momentum=0.9, weight_decay=5e-4,
                       device=torch.device("cpu"))
        if repeat:
            times.append(result.seconds / args.local_steps)
    return 1000 * statistics.median(times)


def bare(args: argparse.Namespace) -> float:
    """Median ms per step of a bare PyTorch SGD loop on one fixed batch, 1 thread."""
    torch.set_num_threads(1)
    settings = RunSettings.from_run_config({"dataset": args.dataset, "model": args.model, "base-width": args.width})
    model = build_model(resolve_model(settings)[0]).train()
    images, labels = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    times = []
    for step in range(args.local_steps + 1):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def report(args: argparse.Namespace, figures: dict[str, Any]) -> str:
    ins = figures["inside"]
    lines = [f"flwr run, {args.model} width {args.width}, {args.dataset}, {args.supernodes} SuperNodes, "
             f"{args.fraction:g} of them per round, {args.local_steps} local steps of {args.batch_size}, "
             f"{args.rounds} rounds, CPU ({os.cpu_count()} cores)",
             f"  start-up (launch to round 1's row): {ins['startup-seconds']:.1f} s; "
             f"whole run {ins['wall-seconds']:.1f} s",
             "  round seconds: " + " ".join(f"{s:.2f}" for s in ins["round-seconds"]),
             "  sampled nodes' training seconds (sum): " + " ".join(f"{s:.2f}" for s in ins["node-train-seconds"]),
             "  server evaluation seconds: " + " ".join("-" if s is None else f"{s:.2f}" for s in ins["eval-seconds"]),
             f"  round seconds - nodes' training seconds / {ACTORS} actors (median, rounds 2..): "
             f"{ins['round-minus-training']:.2f} s",
             f"  a node's step inside the simulation: {ins['step-ms']:.1f} ms",
             f"  the same steps outside Flower, train(), 1 thread: {figures['outside-1-thread-ms']:.1f} ms",
             f"  the same steps outside Flower, train(), {figures['threads']} threads: "
             f"{figures['outside-all-threads-ms']:.1f} ms",
             f"  a bare PyTorch step, 1 thread: {figures['bare-ms']:.1f} ms",
             f"  inside / outside (1 thread): {ins['step-ms'] / figures['outside-1-thread-ms']:.3f}",
             f"  inside / outside ({figures['threads']} threads): "
             f"{ins['step-ms'] / figures['outside-all-threads-ms']:.3f}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--supernodes", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-subset", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="outside Flower: timed repeats of the local steps")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="resist-speed-"))
    try:
        figures = {"inside": inside(args, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    threads, before = os.cpu_count() or 1, torch.get_num_threads()
    try:
        figures.update({"threads": threads, "outside-1-thread-ms": outside(args, 1),
                        "outside-all-threads-ms": outside(args, threads), "bare-ms": bare(args)})
    finally:
        torch.set_num_threads(before)  # the caller's process keeps its thread count
    print(report(args, figures))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
