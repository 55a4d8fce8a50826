"""Server time: ``configure_train`` + ``aggregate_train`` as a share of a round, ResIST and FedAvg.

PreActResNet-101 (CIFAR-10, width 64), 8 nodes on an in-process grid whose ClientApp returns the
arrays it received (nothing trains, so the replies are real payloads of the right keys and the
strategy's merge does its full work). The server parts are timed on the real strategies (median
over ``--repeats`` rounds). A round's client part is what the slowest node trains: ``--local-steps``
SGD steps (batch ``--batch-size``) of the largest sub-network (ResIST) or the full model (FedAvg),
measured here as step time x steps (``--timed-steps`` steps timed). Nodes train in parallel, so

    round = configure + slowest node's training + aggregate      (transfer time not included)

    python benchmarks/server_benchmark.py [--model preact_resnet101] [--width 64] [--nodes 8]
                                          [--local-steps 50] [--batch-size 32] [--timed-steps 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds `benchmarks`
from benchmarks.figures_json import markdown_row, write_figures
from benchmarks.step_benchmark import step_seconds  # noqa: E402
from client_app.app import identity_handler
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import PRESET_DEPTHS, ModelSpec, build_model
from resist_fl.core.validation import TRAIN_METRICS
from resist_fl.flower.fedavg import ScreenedFedAvg
from resist_fl.flower.resist import ResIST
from simulations.inprocess_grid import InProcessGrid


def echo_app() -> ClientApp:
    """Replies with the arrays it was sent and valid training metrics (trains nothing)."""
    app = ClientApp()
    app.query()(identity_handler)

    @app.train()
    def echo(msg: Message, context: Context) -> Message:
        metrics = MetricRecord(dict(zip(TRAIN_METRICS, (100, 1.0, 0.0, 1))))
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

    return app


def server_seconds(strategy, arrays: ArrayRecord, nodes: int, repeats: int) -> tuple[float, float, list[Message]]:
    """Median seconds of ``configure_train`` and of ``aggregate_train``, and round 1's messages."""
    grid = InProcessGrid(echo_app(), num_nodes=nodes)
    configure, aggregate, first = [], [], None
    for server_round in range(1, repeats + 1):
        start = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
        configure.append(time.perf_counter() - start)
        replies = list(grid.send_and_receive(messages))
        start = time.perf_counter()
        merged, _ = strategy.aggregate_train(server_round, replies)
        aggregate.append(time.perf_counter() - start)
        if merged is None:
            raise RuntimeError(f"round {server_round}: the strategy refused the replies")
        first = first or messages
    return statistics.median(configure), statistics.median(aggregate), first


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preact_resnet101", choices=sorted(PRESET_DEPTHS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    spec = ModelSpec(depths=PRESET_DEPTHS[args.model], base_width=args.width, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    state = build_model(spec).state_dict()
    arrays = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    strategies = {
        "resist": ResIST(layout, min_train_nodes=args.nodes, min_available_nodes=args.nodes, capacity_measure="blocks"),
        "fedavg": ScreenedFedAvg(min_train_nodes=args.nodes, min_available_nodes=args.nodes, capacity_measure="blocks"),
    }
    setting = (f"{args.model} width {args.width}, {args.nodes} nodes, {args.local_steps} local steps of batch "
               f"{args.batch_size} (CPU, {torch.get_num_threads()} threads); median of {args.repeats} rounds")
    columns = ["strategy", "configure s", "aggregate s", "slowest node's training s", "round s", "server share"]
    print(setting)
    print(markdown_row(columns))
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, strategy in strategies.items():
        configure, aggregate, messages = server_seconds(strategy, arrays, args.nodes, args.repeats)
        if name == "resist":
            largest = max((list(m.content["config"]["blocks"]) for m in messages), key=len)
            model = layout.build_subnetwork(spec, largest)
        else:
            model = build_model(spec)
        training = args.local_steps * step_seconds(model.train(), images, labels, args.timed_steps, amp=False)
        server = configure + aggregate
        cells = [name, f"{configure:.4f}", f"{aggregate:.4f}", f"{training:.3f}", f"{server + training:.3f}",
                 f"{100 * server / (server + training):.2f} %"]
        print(markdown_row(cells), flush=True)
        rows.append(dict(zip(columns, cells)))
    write_figures(args.json, setting, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
