"""The ServerApp and ClientApp end to end on an in-process Grid (real Strategy.start loop)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.core.decomposition import BlockLayout, is_scale_key
from resist_fl.core.model import ModelSpec
from resist_fl.data import EvalBatches, load_test_set, normalization
from resist_fl.run.outputs import load_model, read_metrics
from resist_fl.run.settings import SettingsError
from resist_fl.node.training import evaluate
from simulations.inprocess import run_inprocess


def run_dir(config) -> Path:
    return Path(config["output-dir"]) / config["run-name"]


def train_messages(grid):
    return [m for m in grid.sent if m.metadata.message_type == "train"]


def train_replies(grid):
    return [r for r in grid.replies if r.metadata.message_type == "train"]


def test_resist_sends_each_node_only_its_own_subnetwork(tiny_config):
    grid = run_inprocess(tiny_config, num_nodes=3)
    spec = ModelSpec.from_dict(json.loads((run_dir(tiny_config) / "run_config.json").read_text())["model_spec"])
    layout = BlockLayout.from_spec(spec)
    sent = train_messages(grid)
    assert len(sent) == 3 * 2
    for round_msgs in (sent[:3], sent[3:]):
        block_sets = [tuple(m.content["config"]["blocks"]) for m in round_msgs]
        assert len(set(block_sets)) == 3, "one distinct sub-network per node"
        assert sorted(b for bs in block_sets for b in bs) == list(layout.partitionable)
        for msg, blocks in zip(round_msgs, block_sets):
            assert list(msg.content["arrays"].keys()) == list(layout.payload_keys(blocks))
            assert not any(is_scale_key(k) for k in msg.content["arrays"])
    # every reply carries exactly the keys its node received
    for msg, reply in zip(sent, train_replies(grid)):
        assert list(reply.content["arrays"].keys()) == list(msg.content["arrays"].keys())
        assert set(reply.content["metrics"].keys()) >= {"num-examples", "train-loss", "train-seconds"}


def test_resist_merge_writes_each_block_from_its_holders_only(tiny_config):
    tiny_config["num-server-rounds"] = 1
    grid = run_inprocess(tiny_config, num_nodes=3)
    final = load_model(run_dir(tiny_config) / "model.pt").state_dict()
    sent = train_messages(grid)
    weights = {r.metadata.src_node_id: r.content["metrics"]["num-examples"] for r in train_replies(grid)}
    for key in final:
        if is_scale_key(key):
            continue
        holders = [(r, weights[r.metadata.src_node_id]) for r in train_replies(grid) if key in r.content["arrays"]]
        assert holders, key
        expected = sum(r.content["arrays"][key].numpy().astype(np.float64) * w for r, w in holders)
        expected /= sum(w for _, w in holders)
        np.testing.assert_allclose(final[key].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)
    assert all(len(m.content["config"]["blocks"]) >= 1 for m in sent)


def test_saved_model_reproduces_logged_accuracy_with_its_scales(tiny_config):
    tiny_config["amp"] = False  # the re-evaluation below is fp32
    run_inprocess(tiny_config, num_nodes=2)
    rows = read_metrics(run_dir(tiny_config))
    assert [r["round"] for r in rows] == [1, 2]
    model = load_model(run_dir(tiny_config) / "model.pt")
    assert model.layer3[1].residual_scale.item() == pytest.approx(0.5)  # 1/S with S = 2
    test = EvalBatches(load_test_set("synthetic"), 250, normalization=normalization("synthetic"))
    loss, accuracy = evaluate(model, test, torch.device("cpu"))
    assert accuracy == pytest.approx(rows[-1]["accuracy"])
    summary = json.loads((run_dir(tiny_config) / "summary.json").read_text())
    assert summary["total-bytes"] == rows[-1]["cumulative-bytes"]


def test_fedavg_runs_the_same_app_and_costs_more_bytes(tiny_config):
    resist = dict(tiny_config, **{"run-name": "resist", "num-server-rounds": 1})
    fedavg = dict(tiny_config, **{"run-name": "fedavg", "num-server-rounds": 1, "strategy": "fedavg"})
    run_inprocess(resist, num_nodes=3)
    grid = run_inprocess(fedavg, num_nodes=3)
    assert all("blocks" not in m.content["config"] for m in train_messages(grid))
    r, f = read_metrics(run_dir(resist))[0], read_metrics(run_dir(fedavg))[0]
    assert r["bytes-down"] < f["bytes-down"] and r["bytes-up"] < f["bytes-up"]
    assert r["nodes"] == f["nodes"] == 3
    assert f["bytes-down"] == sum(m.content["arrays"].count_bytes() for m in train_messages(grid))
    assert 0 <= f["accuracy"] <= 1 and f["train-loss"] > 0


@pytest.mark.parametrize("key, value, allowed", [
    ("strategy", "fedprox", "resist, fedavg"),
    ("model", "resnet9", "preact_resnet18"),
    ("dataset", "svhn", "cifar10"),
    ("partitioner", "shards", "iid, dirichlet"),
    ("norm", "layernorm", "batchnorm"),
    ("num-server-rounds", 0, ">= 1"),
    ("local-steps", 0, ">= 1"),
    ("min-blocks-per-site", 9, "at most 3"),
    ("fraction-train", 0.0, "(0, 1]"),
    ("fraction-train", 1.5, "(0, 1]"),
    ("partitioned-stages", "3,7", "1-4"),
    ("batch-size", "big", "type int"),
    ("num-rounds", 3, "known keys"),
    ("min-train-nodes", 0, ">= 1"),
    ("min-train-nodes", 3, "min-available-nodes"),
    ("min-train-replies", 3, "min-train-nodes"),
])
def test_bad_run_config_stops_before_round_one(tiny_config, key, value, allowed):
    tiny_config[key] = value
    with pytest.raises(SettingsError) as err:
        run_inprocess(tiny_config, num_nodes=2)
    message = str(err.value)
    assert key in message and repr(value) in message and allowed in message


def test_min_depth_duplicates_blocks_and_scales_by_held_fraction(tiny_config):
    tiny_config.update({"min-blocks-per-site": 2, "num-server-rounds": 1})
    grid = run_inprocess(tiny_config, num_nodes=3)
    assert all(len(m.content["config"]["blocks"]) == 2 for m in train_messages(grid))
    assert read_metrics(run_dir(tiny_config))[0]["inference-scale"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("strategy", ["fedavg", "resist"])
def test_integer_buffers_stay_integer_across_rounds(tiny_config, strategy):
    tiny_config.update({"strategy": strategy, "norm": "batchnorm-running", "local-steps": 2})
    run_inprocess(tiny_config, num_nodes=2)
    rows = read_metrics(run_dir(tiny_config))
    assert [r["replies-accepted"] for r in rows] == [2, 2]
    state = torch.load(run_dir(tiny_config) / "model.pt", weights_only=True)["state_dict"]
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert state["layer1.0.bn1.num_batches_tracked"].item() == 4  # 2 steps in each of 2 rounds


def test_same_seed_same_run_whatever_the_node_ids(tiny_config):
    """Flower gives nodes new random ids every run; sampling follows partition ids instead."""
    tiny_config.update({"num-server-rounds": 1, "fraction-train": 0.67, "min-available-nodes": 3})
    first = dict(tiny_config, **{"run-name": "first"})
    second = dict(tiny_config, **{"run-name": "second"})
    run_inprocess(first, num_nodes=3)
    # the same partitions on nodes whose ids now sort the other way round
    run_inprocess(second, num_nodes=3,
                  node_configs=[{"partition-id": 2 - i, "num-partitions": 3} for i in range(3)])
    a = load_model(run_dir(first) / "model.pt").state_dict()
    b = load_model(run_dir(second) / "model.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nodes_train_on_their_own_npz_files(tiny_config, tmp_path):
    from resist_fl.data import load_partition

    full = load_partition("synthetic", 0, 1)
    test = load_test_set("synthetic")

    def write(name, n):
        path = tmp_path / name
        np.savez(path, x_train=full.images[:n], y_train=full.labels[:n], x_test=test.images, y_test=test.labels)
        return str(path)

    server = write("server.npz", 10)
    nodes = [{"partition-id": 0, "num-partitions": 1, "data-path": write(f"node{i}.npz", n)}
             for i, n in enumerate((100, 50))]
    tiny_config.update({"dataset": "npz", "data-path": server, "num-server-rounds": 1})
    grid = run_inprocess(tiny_config, num_nodes=2, node_configs=nodes)
    assert sorted(r.content["metrics"]["num-examples"] for r in train_replies(grid)) == [50, 100]
    assert read_metrics(run_dir(tiny_config))[0]["accuracy"] is not None


def test_a_nodes_own_files_with_other_channels_than_the_servers_are_named(tiny_config, tmp_path):
    from resist_fl.data import DataError, load_partition

    full, test = load_partition("synthetic", 0, 1), load_test_set("synthetic")
    server, node = tmp_path / "server.npz", tmp_path / "gray.npz"
    np.savez(server, x_train=full.images[:10], y_train=full.labels[:10], x_test=test.images, y_test=test.labels)
    np.savez(node, x_train=full.images[:20, 0], y_train=full.labels[:20], x_test=test.images[:, 0],
             y_test=test.labels)  # N x H x W: one channel
    tiny_config.update({"dataset": "npz", "data-path": str(server), "num-server-rounds": 1})
    nodes = [{"partition-id": 0, "num-partitions": 1, "data-path": str(node)}] * 2
    with pytest.raises(DataError, match="has 1-channel images, but the run's model takes 3"):
        run_inprocess(tiny_config, num_nodes=2, node_configs=nodes)


def test_fedavg_federated_evaluation_is_recorded(tiny_config):
    tiny_config.update({"strategy": "fedavg", "fraction-evaluate": 1.0, "num-server-rounds": 1})
    run_inprocess(tiny_config, num_nodes=2)
    row = read_metrics(run_dir(tiny_config))[0]
    assert 0 <= row["client-eval-acc"] <= 1 and row["client-eval-loss"] > 0


def test_resume_without_rounds_left_keeps_the_inference_scale(tiny_config):
    tiny_config["num-server-rounds"] = 1
    run_inprocess(tiny_config, num_nodes=3)
    before = load_model(run_dir(tiny_config) / "model.pt").layer3[1].residual_scale.item()
    run_inprocess(dict(tiny_config, resume=True), num_nodes=3)
    scale = load_model(run_dir(tiny_config) / "model.pt").layer3[1].residual_scale.item()
    assert scale == before == pytest.approx(1 / 3)


@pytest.mark.parametrize("node, message", [
    ({"num-partitions": 4}, "partition-id = None: expected an integer"),
    ({"partition-id": "0", "num-partitions": 4}, "partition-id = '0': expected an integer"),
    ({"partition-id": 0, "num-partitions": True}, "num-partitions = True: expected an integer"),
    ({"partition-id": -1, "num-partitions": 4}, "partition-id = -1, num-partitions = 4: expected"),
    ({"partition-id": 4, "num-partitions": 4}, "partition-id = 4, num-partitions = 4: expected"),
    ({"partition-id": 0, "num-partitions": 0}, "num-partitions = 0: expected num-partitions >= 1"),
])
def test_a_bad_partition_in_the_node_config_is_named(node, message):
    from client_app.app import partition_of

    with pytest.raises(ValueError, match=re.escape(message)):
        partition_of(node)
    assert partition_of({"partition-id": 3, "num-partitions": 4}) == (3, 4)
