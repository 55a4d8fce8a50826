"""Bytes of one round's training messages, ResIST / FedAvg, from the records the strategies build.

For PreActResNet-101 (CIFAR-10, width 64: the paper's model) at S = 2, 4, 8 sampled nodes, with
and without a minimum depth, under each ``transport-dtype``: the strategies' own
``configure_train`` builds the messages (on an in-process grid, nothing trains), and the bytes
are what the ServerApp's metering counts (``ArrayRecord.count_bytes()`` of every message). The
ratio ResIST / FedAvg is printed beside the analytic sub-network fraction: the parameters a
round's sub-networks hold (shared layers once per node, each block once per holder) over S
full models. Uplink equals downlink (every node returns what it was sent).

    python benchmarks/bytes_benchmark.py [--model preact_resnet101] [--width 64] [--sites 2 4 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the root holds the tooling
from client_app.app import identity_handler
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import PRESET_DEPTHS, ModelSpec, build_model
from resist_fl.core.transport import TRANSPORT_DTYPES
from resist_fl.flower.fedavg import ScreenedFedAvg
from resist_fl.flower.metering import array_bytes
from resist_fl.flower.resist import ResIST
from benchmarks.figures_json import markdown_row, write_figures
from simulations.inprocess_grid import InProcessGrid


def silent_app() -> ClientApp:
    """Answers the partition query; never trains (its replies are not used)."""
    app = ClientApp()
    app.query()(identity_handler)
    app.train()(lambda msg, context: Message(RecordDict({}), reply_to=msg))
    return app


def round_bytes(strategy, arrays: ArrayRecord, sites: int) -> tuple[int, list[Message]]:
    grid = InProcessGrid(silent_app(), num_nodes=sites)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), grid))
    return sum(array_bytes(m) for m in messages), messages


def analytic_fraction(layout: BlockLayout, sizes: dict[str, int], messages: list[Message], sites: int) -> float:
    """Parameters the sub-networks hold (from the blocks each message names) over S full models."""
    full = sum(sizes[k] for k in layout.payload_keys())
    held = sum(sum(sizes[k] for k in layout.payload_keys(list(m.content["config"]["blocks"]))) for m in messages)
    return held / (sites * full)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="preact_resnet101", choices=sorted(PRESET_DEPTHS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--min-blocks", type=int, default=4, help="the minimum depth compared with none")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/figures_json.py)")
    args = parser.parse_args(argv)
    spec = ModelSpec(depths=PRESET_DEPTHS[args.model], base_width=args.width, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    state = build_model(spec).state_dict()
    arrays = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    sizes = {k: int(np.prod(state[k].shape)) * state[k].element_size() for k in layout.payload_keys()}
    setting = (f"{args.model} width {args.width}: {sum(sizes.values()) / 1e6:.1f} MB float32, "
               f"{len(layout.partitionable)} partitionable blocks")
    columns = ["S", "min depth", "transport", "ResIST MB", "FedAvg MB", "ResIST / FedAvg", "analytic", "deviation",
               "ResIST bytes / float32's"]
    print(setting)
    print(markdown_row(columns))
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for sites in args.sites:
        for min_blocks in sorted({0, min(args.min_blocks, len(layout.partitionable))}):
            float32 = None
            for transport in TRANSPORT_DTYPES:
                common = {"min_train_nodes": sites, "min_available_nodes": sites, "transport_dtype": transport,
                          "capacity_measure": "blocks"}
                resist, messages = round_bytes(ResIST(layout, min_blocks_per_site=min_blocks, **common), arrays, sites)
                fedavg, _ = round_bytes(ScreenedFedAvg(**common), arrays, sites)
                ratio, analytic = resist / fedavg, analytic_fraction(layout, sizes, messages, sites)
                float32 = float32 or resist
                cells = [str(sites), str(min_blocks), transport, f"{resist / 1e6:.4f}", f"{fedavg / 1e6:.4f}",
                         f"{ratio:.4f}", f"{analytic:.4f}", f"{100 * (ratio / analytic - 1):+.2f} %",
                         f"{resist / float32:.4f}"]
                print(markdown_row(cells), flush=True)
                rows.append(dict(zip(columns, cells)))
    write_figures(args.json, setting, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
