"""The legacy-API adapter, driven through Flower's legacy path (ServerApp(server_fn=...) and a
NumPyClient), merges exactly what the Message-API ResIST merges from the same replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from client_app.app import identity_handler
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.validation import TRAIN_METRICS
from resist_fl.flower.array_codec import array_of
from resist_fl.flower.legacy import KEYS, LegacyResIST, named_arrays
from resist_fl.flower.resist import ResIST
from simulations.inprocess_grid import InProcessGrid

SPEC = ModelSpec(depths=(1, 1, 5, 1), base_width=4, num_classes=10)
ROUNDS, NODES = 3, 3


def reply(named: dict[str, np.ndarray], partition: int) -> dict[str, np.ndarray]:
    """A deterministic 'training': float arrays move by a partition- and name-dependent step."""
    return {k: (v + 0.01 * (partition + 1) * (len(k) % 5)).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in named.items()}


def examples(partition: int) -> int:
    return 100 * (partition + 1)


def initial_state() -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    return {k: v.numpy() for k, v in build_model(SPEC).state_dict().items()}


def message_api_result(layout: BlockLayout) -> dict[str, np.ndarray]:
    app = ClientApp()
    app.query()(identity_handler)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        arrays = reply({k: a.numpy() for k, a in msg.content["arrays"].items()}, partition)
        metrics = MetricRecord(dict(zip(TRAIN_METRICS, (examples(partition), 1.0, 0.1, 1))))
        return Message(RecordDict({"arrays": ArrayRecord({k: array_of(v) for k, v in arrays.items()}),
                                   "metrics": metrics}), reply_to=msg)

    state = initial_state()
    strategy = ResIST(layout, min_train_nodes=NODES, min_available_nodes=NODES, seed=0, capacity_measure="blocks")
    result = strategy.start(grid=InProcessGrid(app, num_nodes=NODES), num_rounds=ROUNDS,
                            initial_arrays=ArrayRecord({k: array_of(state[k]) for k in layout.payload_keys()}),
                            train_config=ConfigRecord({}))
    return {k: v.numpy() for k, v in result.arrays.items()}


class FixedStepClient(NumPyClient):
    def __init__(self, partition: int) -> None:
        self.partition = partition

    def fit(self, parameters, config):
        named = reply(named_arrays(config, parameters), self.partition)
        return [named[k] for k in str(config[KEYS]).split(",")], examples(self.partition), {}


def legacy_api_result(layout: BlockLayout) -> dict[str, np.ndarray]:
    strategy = LegacyResIST(layout, initial_state(), min_train_nodes=NODES, min_available_nodes=NODES, seed=0,
                            capacity_measure="blocks")
    server = ServerApp(server_fn=lambda context: ServerAppComponents(strategy=strategy,
                                                                     config=ServerConfig(num_rounds=ROUNDS)))
    client = ClientApp(client_fn=lambda context: FixedStepClient(int(context.node_config["partition-id"])).to_client())
    grid = InProcessGrid(client, num_nodes=NODES)
    server(grid, Context(run_id=grid.run.run_id, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    return strategy.global_state


def test_legacy_adapter_merges_what_the_message_api_strategy_merges():
    layout = BlockLayout.from_spec(SPEC)
    ours, theirs = legacy_api_result(layout), message_api_result(layout)
    assert set(ours) == set(theirs) == set(layout.payload_keys())
    moved = [k for k in ours if not np.array_equal(ours[k], initial_state()[k])]
    assert any(k.startswith("layer3.") for k in moved)  # training really reached the partitioned blocks
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_key_names_travel_with_the_arrays():
    layout = BlockLayout.from_spec(SPEC)
    with pytest.raises(ValueError, match="2 arrays for 3 names"):
        named_arrays({KEYS: "a,b,c"}, [np.zeros(1), np.zeros(1)])
    with pytest.raises(ValueError, match="initial_state lacks"):
        LegacyResIST(layout, {}, capacity_measure="blocks")
