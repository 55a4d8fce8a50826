"""Heterogeneous federations: node capacities, allocation policies, any-depth evaluation,
per-node costs (nodes.jsonl), simulated stragglers and the projected time at link speeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resist_fl.run.outputs import NODES_FILE, read_metrics
from simulations.inprocess import run_inprocess
from simulations.node_costs import projected_round_seconds, time_to_target
from simulations.report import build_report

# 6 partitionable blocks in stage 3; capacity = their fraction
SIX_BLOCKS = {"stage-depths": "1,1,7,1", "capacity-measure": "blocks"}


def _run(config: dict, **grid) -> tuple[list[dict], list[dict]]:
    run_inprocess(config, **grid)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    return read_metrics(run_dir), read_metrics(run_dir, NODES_FILE)


def test_capacity_sets_the_depths_and_every_row_is_written(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 2, "capacity-profile": "1.0,0.5",
                                      "allocation": "capacity", "eval-depths": "25,50,100"})
    metrics, nodes = _run(tiny_config, num_nodes=2)
    for row in metrics:  # any-depth evaluation: the full depth is the full model
        assert {"accuracy-depth-25", "accuracy-depth-50", "accuracy-depth-100"} <= set(row)
        assert row["accuracy-depth-100"] == row["accuracy"]
        assert 0 <= row["accuracy-depth-25"] <= 1
    assert len(nodes) == 4 and [(r["round"], r["partition"]) for r in nodes] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [(r["capacity"], r["max-blocks"], r["blocks"]) for r in nodes[:2]] == [(1.0, 6, 4), (0.5, 3, 2)]
    assert all(r["status"] == "accepted" and r["over-capacity"] == 0 for r in nodes)
    assert all(r["bytes-down"] > 0 and r["bytes-up"] == r["bytes-down"] for r in nodes)
    assert all(r["train-seconds"] > 0 and r["peak-memory-mb"] >= 0 and r["simulated-seconds"] == 0 for r in nodes)
    assert {r["memory-measure"] for r in nodes} == {"rss-peak-over-start"}
    assert metrics[-1]["held-fraction"] == pytest.approx((4 + 2) / (2 * 6))
    assert metrics[-1]["inference-scale"] == pytest.approx(0.5)


def test_a_nodes_own_capacity_wins_over_the_profile(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "capacity-profile": "1.0"})
    node_configs = [{"partition-id": 0, "num-partitions": 2, "capacity": 0.25},
                    {"partition-id": 1, "num-partitions": 2}]
    _, nodes = _run(tiny_config, num_nodes=2, node_configs=node_configs)
    assert [(r["capacity"], r["max-blocks"]) for r in nodes] == [(0.25, 1), (1.0, 6)]
    assert nodes[0]["blocks"] == 1 and nodes[1]["blocks"] == 5  # uniform 3 + 3, capped at 1: the rest spills


def test_speed_allocation_moves_blocks_from_a_slow_node_to_a_fast_one(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 3, "slowdown-profile": "1,4", "allocation": "speed",
                                      "local-steps": 4, "eval-every": 3})
    _, nodes = _run(tiny_config, num_nodes=2)
    blocks = {(r["round"], r["partition"]): r["blocks"] for r in nodes}
    assert blocks[(1, 0)] == blocks[(1, 1)] == 3  # nothing measured yet: equal capacities, equal depths
    assert blocks[(3, 1)] < blocks[(3, 0)] and blocks[(2, 1)] < 3  # the 4x slower node gets fewer blocks
    slow = [r for r in nodes if r["partition"] == 1]
    assert all(r["simulated-seconds"] > 0 for r in slow)  # the slowdown is simulated, and labelled as such


def test_fedavg_nodes_over_capacity_are_marked(tiny_config):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1, "capacity-profile": "1.0,0.5", "strategy": "fedavg"})
    _, nodes = _run(tiny_config, num_nodes=2)
    assert [(r["blocks"], r["over-capacity"]) for r in nodes] == [(6, 0), (6, 1)]


# ------------------------------------------------------------ time at link speeds

NODES = [  # two rounds of two nodes: bytes and seconds chosen for a hand computation
    {"round": 1, "bytes-down": 1_000_000, "bytes-up": 1_000_000, "train-seconds": 2.0},
    {"round": 1, "bytes-down": 250_000, "bytes-up": 250_000, "train-seconds": 3.0},
    {"round": 2, "bytes-down": 1_000_000, "bytes-up": 1_000_000, "train-seconds": 2.0},
    {"round": 2, "bytes-down": 4_000_000, "bytes-up": 0, "train-seconds": None},  # no valid reply
]
METRICS = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.8}]


def test_projected_round_time_is_the_slowest_nodes_transfer_plus_training():
    # 10 Mbit/s: node A 2 MB = 16 Mbit = 1.6 s + 2 s = 3.6 s; node B 0.5 MB = 0.4 s + 3 s = 3.4 s
    assert projected_round_seconds(NODES, 10) == pytest.approx({1: 3.6, 2: 3.6})
    # 1 Mbit/s: A 16 s + 2 s = 18 s; B 4 s + 3 s = 7 s
    assert projected_round_seconds(NODES, 1) == pytest.approx({1: 18.0, 2: 18.0})
    assert time_to_target(METRICS, {1: 3.6, 2: 3.6}, 0.7) == pytest.approx(7.2)
    assert time_to_target(METRICS, {1: 3.6, 2: 3.6}, 0.5) == pytest.approx(3.6)
    assert time_to_target(METRICS, {1: 3.6, 2: 3.6}, 0.9) is None
    with pytest.raises(ValueError, match="> 0 Mbit/s"):
        projected_round_seconds(NODES, 0)


def test_report_tables_match_the_hand_computation(tmp_path):
    for name in ("main-resist-seed0", "main-fedavg-seed0"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        rows = [dict(m, **{"strategy": name.split("-")[1], "loss": None, "bytes-down": 1, "bytes-up": 1,
                           "cumulative-bytes": 2 * m["round"], "round-seconds": 1.0}) for m in METRICS]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        nodes = [dict(n, strategy="x", capacity=1.0, blocks=1, **{"over-capacity": 0}) for n in NODES]
        (run_dir / NODES_FILE).write_text("".join(json.dumps(n) + "\n" for n in nodes))
        (run_dir / "summary.json").write_text("{}")
    (tmp_path / "compare.json").write_text(json.dumps({"preset": "links", "runs": [
        {"name": n, "variant": "main", "strategy": n.split("-")[1], "seed": 0, "status": "ok"}
        for n in ("main-resist-seed0", "main-fedavg-seed0")]}))
    report = build_report(tmp_path, target_accuracy_value=0.7, bandwidths=[10, 1]).read_text()
    assert "| ResIST | 3.60 | 18.00 | 7.2 (1/1) | 36.0 (1/1) |" in report
    assert "| FedAvg | 3.60 | 18.00 | 7.2 (1/1) | 36.0 (1/1) |" in report
    assert (tmp_path / "accuracy_vs_projected_seconds.png").exists()


def test_an_invalid_node_capacity_is_named_and_the_node_still_trains(tiny_config, caplog):
    tiny_config.update(SIX_BLOCKS, **{"num-server-rounds": 1})
    node_configs = [{"partition-id": 0, "num-partitions": 2, "capacity": 1.5},
                    {"partition-id": 1, "num-partitions": 2}]
    with caplog.at_level("WARNING"):
        _, nodes = _run(tiny_config, num_nodes=2, node_configs=node_configs, raise_client_errors=False)
    assert "did not answer the identity query" in caplog.text and "capacity = 1.5" in caplog.text
    assert {(r["partition"], r["capacity"]) for r in nodes} == {(None, 1.0), (1, 1.0)}


def test_the_straggler_mod_sleeps_the_extra_time_and_says_so_and_is_the_client_apps_only_delay(monkeypatch):
    """The slowdown lives in a ClientApp mod (simulation only): a node at factor 3 sleeps 2x its training
    seconds, reported in train-seconds and apart as simulated-seconds; other messages pass untouched."""
    from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

    import client_app.app as client
    from resist_fl.flower import straggler_mod

    slept = []
    monkeypatch.setattr(straggler_mod.time, "sleep", slept.append)

    def handler(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"train-seconds": 1.5, "num-examples": 3})}), reply_to=msg)

    def message(kind):
        return Message(RecordDict(), dst_node_id=1, message_type=kind)

    def context(partition):
        return Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(),
                       run_config={"slowdown-profile": "1,3"})

    reply = straggler_mod.simulated_straggler(message(MessageType.TRAIN), context(1), handler)
    assert slept == [pytest.approx(3.0)]
    assert reply.content["metrics"]["train-seconds"] == pytest.approx(4.5)
    assert reply.content["metrics"]["simulated-seconds"] == pytest.approx(3.0)
    reply = straggler_mod.simulated_straggler(message(MessageType.TRAIN), context(0), handler)
    assert reply.content["metrics"]["simulated-seconds"] == 0.0 and slept[-1] == 0.0
    slept.clear()
    straggler_mod.simulated_straggler(message(MessageType.EVALUATE), context(1), handler)
    assert slept == []
    assert straggler_mod.simulated_straggler in client.app._mods
    assert "time.sleep" not in Path(client.__file__).read_text()
