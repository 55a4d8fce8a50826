"""Federated-evaluation replies go through the same screening rule as training replies (issue 32,
item 8), and what shapes the model travels in evaluate messages too (fedavg-small)."""

from __future__ import annotations

from pathlib import Path

import pytest
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from client_app.app import app as client_app
from resist_fl.run.outputs import read_metrics
from simulations.inprocess_grid import InProcessGrid
from server_app.app import main as server_main


class _TwiceAnsweringGrid(InProcessGrid):
    """One node answers every evaluate message twice: its own reply, then a forged one."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg in messages:
            if msg.metadata.message_type == "evaluate" and msg.metadata.dst_node_id == self.node_ids[0]:
                forged = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1000, "eval-loss": 50.0,
                                                                      "eval-acc": 0.0})}), reply_to=msg)
                self.forged[msg.metadata.message_id] = forged
        return ids

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        replies = list(super().pull_messages(message_ids))
        replies += [self.forged.pop(i) for i in message_ids if i in self.forged]
        return replies

    @property
    def forged(self) -> dict:
        return self.__dict__.setdefault("_forged", {})


def _run(config: dict, grid_class=InProcessGrid, num_nodes: int = 3) -> list[dict]:
    grid = grid_class(client_app, num_nodes=num_nodes, run_config=config)
    server_main(grid, Context(run_id=grid.run.run_id, node_id=1, node_config={}, state=RecordDict(),
                              run_config=config))
    return read_metrics(Path(config["output-dir"]) / config["run-name"])


def test_a_second_reply_to_an_evaluate_message_is_not_counted(tiny_config, caplog):
    base = {**tiny_config, "strategy": "fedavg", "fraction-evaluate": 1.0, "num-server-rounds": 1, "local-steps": 2,
            "min-train-nodes": 3, "min-available-nodes": 3}
    honest = _run({**base, "run-name": "honest"})
    attacked = _run({**base, "run-name": "attacked"}, _TwiceAnsweringGrid)
    assert attacked[0]["client-eval-loss"] == pytest.approx(honest[0]["client-eval-loss"], rel=1e-6)
    assert "a second reply to the same evaluate message" in caplog.text


class _PaddedReplyGrid(InProcessGrid):
    """One node's evaluate replies carry an ArrayRecord beside their metrics."""

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(list(message_ids)))
        for reply in replies:
            if reply.metadata.message_type == "evaluate" and reply.metadata.src_node_id == self.node_ids[0]:
                reply.content["padding"] = ArrayRecord({"x": Array(np.zeros(1000, np.float32))})
        return replies


def test_an_evaluate_reply_carrying_more_than_its_metrics_is_dropped(tiny_config, caplog):
    config = {**tiny_config, "strategy": "fedavg", "fraction-evaluate": 1.0, "num-server-rounds": 1, "local-steps": 2,
              "min-train-nodes": 3, "min-available-nodes": 3, "run-name": "padded"}
    _run(config, _PaddedReplyGrid)
    assert "expected exactly one MetricRecord and nothing else (got 1 MetricRecord(s), 1 ArrayRecord(s)" in caplog.text


def test_fedavg_small_evaluates_at_its_width(tiny_config):
    config = {**tiny_config, "strategy": "fedavg-small", "capacity-profile": "1.0,0.5,0.25", "fraction-evaluate": 1.0,
              "num-server-rounds": 1, "local-steps": 2, "min-train-nodes": 3, "min-available-nodes": 3}
    rows = _run(config)
    assert 0.0 <= rows[0]["client-eval-acc"] <= 1.0 and rows[0]["client-eval-loss"] > 0
