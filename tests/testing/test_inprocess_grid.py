"""Tests for ``simulations/inprocess_grid.py`` driving the real ``FedAvg.start()`` loop."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAvg

from simulations.inprocess_grid import InProcessGrid, make_node_ids


def make_app() -> ClientApp:
    """ClientApp: train adds 1.0 to every array; evaluate reports a metric."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        new = ArrayRecord(
            {k: Array(v.numpy() + 1.0) for k, v in arrays.items()}
        )
        # Persistent per-node state: count the trainings of this node
        calls = context.state.get("calls", MetricRecord({"n": 0}))
        calls["n"] = int(calls["n"]) + 1
        context.state["calls"] = calls
        context.state["last-global"] = arrays  # ArrayRecord kept across rounds
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord(
            {"num-examples": 10 * (pid + 1), "train-loss": float(pid)}
        )
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        mean = float(np.mean(msg.content["arrays"]["w"].numpy()))
        metrics = MetricRecord({"num-examples": 5, "mean-w": mean})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.train("resist")
    def train_resist(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict({"m": MetricRecord({"seen": context.node_id})}),
            reply_to=msg,
        )

    @app.query("boom")
    def boom(msg: Message, context: Context) -> Message:
        context.state["poisoned"] = MetricRecord({"x": 1})
        raise ValueError("boom")

    return app


def initial_arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32))})


def test_fedavg_two_rounds_three_nodes() -> None:
    grid = InProcessGrid(make_app(), num_nodes=3, run_config={"lr": 0.1})
    result = FedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(
        grid=grid, initial_arrays=initial_arrays(), num_rounds=2
    )

    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full((2, 3), 2.0))
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    # weighted by num-examples 10/20/30 -> (0*10 + 1*20 + 2*30) / 60
    assert result.train_metrics_clientapp[1]["train-loss"] == pytest.approx(80 / 60)
    assert result.evaluate_metrics_clientapp[1]["mean-w"] == pytest.approx(1.0)
    assert result.evaluate_metrics_clientapp[2]["mean-w"] == pytest.approx(2.0)

    # 2 rounds x (train + evaluate) x 3 nodes
    assert len(grid.sent) == 12 and len(grid.replies) == 12
    assert [m.metadata.message_type for m in grid.sent[:3]] == [MessageType.TRAIN] * 3
    sent_ids = {m.metadata.message_id for m in grid.sent}
    for reply in grid.replies:
        assert not reply.has_error()
        assert reply.metadata.src_node_id in grid.node_ids
        assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
        assert reply.metadata.reply_to_message_id in sent_ids
        assert reply.metadata.message_id
    # per-node persistent state and configs
    for i, node_id in enumerate(grid.node_ids):
        ctx = grid.context(node_id)
        assert ctx.state["calls"]["n"] == 2
        np.testing.assert_allclose(ctx.state["last-global"]["w"].numpy(), 1.0)
        assert ctx.node_config == {"partition-id": i, "num-partitions": 3}
        assert ctx.run_config == {"lr": 0.1}
        assert ctx.node_id == node_id
    assert grid.node_ids == make_node_ids(3)
    assert SUPERLINK_NODE_ID not in grid.node_ids


def test_fedavg_completes_with_failed_and_dropped_nodes() -> None:
    node_ids = make_node_ids(4)
    grid = InProcessGrid(
        make_app(),
        num_nodes=4,
        run_config={},
        fail_nodes={node_ids[1]},
        drop_nodes={node_ids[2]},
    )
    result = FedAvg().start(grid=grid, initial_arrays=initial_arrays(), num_rounds=2)

    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full((2, 3), 2.0))
    assert set(result.train_metrics_clientapp) == {1, 2}
    errors = [r for r in grid.replies if r.has_error()]
    assert len(errors) == 4  # 2 rounds x (train + evaluate) from the failed node
    assert all(r.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for r in errors)
    assert {r.metadata.src_node_id for r in errors} == {node_ids[1]}
    assert node_ids[2] not in {r.metadata.src_node_id for r in grid.replies}
    assert len(grid.dropped) == 4
    # The failed node never ran; the dropped (straggler) node did run
    assert "calls" not in grid.context(node_ids[1]).state
    assert grid.context(node_ids[2]).state["calls"]["n"] == 2


def test_custom_message_type_and_isolation() -> None:
    grid = InProcessGrid(make_app(), num_nodes=2, run_config={})
    shared = RecordDict({"cfg": ConfigRecord({"a": 1})})
    msgs = [Message(shared, nid, "train.resist", group_id="7") for nid in grid.node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=1.0))
    assert sorted(r.content["m"]["seen"] for r in replies) == sorted(grid.node_ids)
    for msg, reply in zip(msgs, replies):
        assert reply.metadata.message_type == "train.resist"
        assert reply.metadata.group_id == "7"
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.src_node_id == msg.metadata.dst_node_id


def test_client_exception_raises_or_becomes_error_reply() -> None:
    grid = InProcessGrid(make_app(), num_nodes=2, run_config={})
    msg = Message(RecordDict(), grid.node_ids[0], "query.boom")
    with pytest.raises(ValueError, match="boom"):
        grid.send_and_receive([msg])

    grid = InProcessGrid(make_app(), num_nodes=2, run_config={}, raise_client_errors=False)
    msg = Message(RecordDict(), grid.node_ids[0], "query.boom")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error()
    assert reply.error.code == 2
    assert "boom" in (reply.error.reason or "")
    assert reply.metadata.src_node_id == grid.node_ids[0]
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    # State changes of a failing ClientApp call are discarded (as in Flower)
    assert "poisoned" not in grid.context(grid.node_ids[0]).state


def test_unknown_destination_is_rejected() -> None:
    grid = InProcessGrid(make_app(), num_nodes=2, run_config={})
    with pytest.raises(ValueError, match="Unknown dst_node_id"):
        grid.send_and_receive([Message(RecordDict(), 12345, MessageType.TRAIN)])


def test_custom_node_configs() -> None:
    cfgs = [{"partition-id": 5, "num-partitions": 9}, {"partition-id": 7, "num-partitions": 9}]
    grid = InProcessGrid(make_app(), num_nodes=2, run_config={}, node_configs=cfgs)
    assert [grid.context(n).node_config for n in grid.node_ids] == cfgs
