"""DepthFL: exits after every stage, mutual self-distillation, the ensemble of exits at test, a node's
depth by its budget, the merge over each tensor's holders, and the method end to end on real digits."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import identity_handler

from resist_fl.core.decomposition import BlockLayout, is_scale_key
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.model_cost import CostModel
from resist_fl.flower.array_codec import array_view
from resist_fl.flower.depthfl import DepthFL, held_by
from resist_fl.flower.message_keys import DEPTH_EXITS, DISTILL_WEIGHT
from resist_fl.node.mutual_distillation import depthfl_loss, distillation_weight
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings
from simulations.inprocess import run_inprocess
from simulations.inprocess_grid import InProcessGrid

SPEC = ModelSpec(depths=(1, 1, 3, 1), base_width=8, num_classes=5, in_channels=1, exits=4)


@pytest.mark.parametrize("size", [28, 32, 8])
def test_the_multi_exit_model_predicts_with_the_mean_of_its_exits(size):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    x = torch.randn(3, 1, size, size)
    logits = model.exit_logits(x)
    assert len(logits) == 4 and all(z.shape == (3, 5) for z in logits)
    torch.testing.assert_close(model(x), sum(logits) / 4)


def test_a_shallower_model_holds_a_prefix_of_the_deeper_ones_keys_with_the_same_shapes():
    full = build_model(SPEC).state_dict()
    previous: set[str] = set()
    for d in range(1, 5):
        own = build_model(replace(SPEC, exits=d)).state_dict()
        assert previous < set(own) <= set(full)
        assert all(own[k].shape == full[k].shape for k in own)
        assert {k for k in full if held_by(k, d) and not is_scale_key(k)} == {k for k in own if not is_scale_key(k)}
        previous = set(own)
    assert {k.split(".")[1] for k in full if k.startswith("exits.")} == {"0", "1", "2", "3"}


def test_distillation_loss_is_cross_entropy_on_every_exit_plus_the_mean_kl_to_the_others():
    torch.manual_seed(1)
    z = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 2, 1, 1])
    weight = 0.7
    loss = depthfl_loss(z, y, weight)
    by_hand = 0.0
    zs = [t.detach().numpy().astype(np.float64) for t in z]

    def log_softmax(a):
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    for i in range(3):
        by_hand += -log_softmax(zs[i])[np.arange(4), y.numpy()].mean()
        for j in range(3):
            if j != i:
                p = np.exp(log_softmax(zs[j])) + 1e-7
                by_hand += weight * (p * (np.log(p) - log_softmax(zs[i]))).sum(1).mean() / 2
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-5)
    loss.backward()  # a teacher is detached: exit 0's gradient is its own CE and its KL as a student
    assert all(t.grad is not None for t in z)
    assert float(depthfl_loss(z, y, 0.0).detach()) == pytest.approx(sum(
        -log_softmax(a)[np.arange(4), y.numpy()].mean() for a in zs), rel=1e-5)


def test_the_distillation_weight_ramps_up_over_thirty_percent_of_the_rounds():
    assert distillation_weight(0, 100) == pytest.approx(math.exp(-5))
    assert distillation_weight(15, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert distillation_weight(30, 100) == distillation_weight(90, 100) == 1.0
    assert distillation_weight(300, 1000) == 1.0 and distillation_weight(150, 1000) == pytest.approx(math.exp(-1.25))


def test_each_node_gets_the_most_stages_whose_exits_fit_its_budget():
    layout = BlockLayout.from_spec(SPEC)
    costs = CostModel(SPEC, layout, 16)
    flops = {d: costs.exit_cost(d).flops for d in range(1, 5)}
    assert flops[1] < flops[2] < flops[3] < flops[4] == costs.full.flops
    for capacity in (1.0, 0.9, 0.6, 0.3, 0.1, 0.01):
        fitting = [d for d in flops if flops[d] <= capacity * costs.full.flops * (1 + 1e-9)]
        assert costs.max_exits(capacity, "flops") == max(fitting, default=1), capacity
    assert costs.max_exits(0.5, "blocks") == 2 and costs.max_exits(0.2, "blocks") == 1


shift_app = ClientApp()  # a node that returns what it received plus its depth: the merge is then checkable


@shift_app.train()
def _shift(msg: Message, context) -> Message:
    depth = float(msg.content["config"][DEPTH_EXITS])
    arrays = ArrayRecord({k: torch.from_numpy(a.numpy() + depth if a.numpy().dtype.kind == "f" else a.numpy())
                          for k, a in msg.content["arrays"].items()})
    metrics = MetricRecord({"num-examples": 10, "local-steps": 1, "train-loss": 1.0, "train-seconds": 0.1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@shift_app.query()
def _identity(msg: Message, context) -> Message:
    return identity_handler(msg, context)


def test_a_round_sends_each_node_its_depths_keys_and_merges_each_tensor_over_its_holders():
    profile = "1.0,0.1,0.1"
    layout = BlockLayout.from_spec(SPEC)
    costs = CostModel(SPEC, layout, 16)
    settings = RunSettings.from_run_config({"strategy": "depthfl", "capacity-profile": profile, "min-train-nodes": 3,
                                            "min-available-nodes": 3, "num-server-rounds": 10,
                                            "model": "preact_resnet18"})
    strategy = DepthFL(layout, settings, costs=costs)
    state = build_model(SPEC).state_dict()
    initial = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    grid = InProcessGrid(shift_app, num_nodes=3, run_config={"capacity-profile": profile})
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), grid))
    depths = sorted(int(m.content["config"][DEPTH_EXITS]) for m in messages)
    small = costs.max_exits(0.1, "flops")
    assert depths == [small, small, 4]
    for m in messages:
        d = int(m.content["config"][DEPTH_EXITS])
        assert set(m.content["arrays"]) == {k for k in layout.payload_keys() if held_by(k, d)}
        assert m.content["config"][DISTILL_WEIGHT] == pytest.approx(distillation_weight(1, 10))
    merged, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert metrics["replies-accepted"] == 3

    def moved(key):
        return float(np.mean(array_view(merged[key]).astype(np.float64) - array_view(initial[key])))

    assert moved("exits.0.fc.weight") == pytest.approx((small + small + 4) / 3)  # every node holds exit 0
    assert moved("layer1.0.conv1.weight") == pytest.approx((small + small + 4) / 3)
    assert moved("exits.3.fc.weight") == pytest.approx(4.0)  # only the full-budget node
    assert moved("layer4.0.conv1.weight") == pytest.approx(4.0)
    nodes = strategy.round_report().nodes.values()
    assert sorted(n.flops_per_sample for n in nodes) == sorted(costs.exit_cost(d).flops for d in depths)
    assert all(n.over_capacity is False for n in nodes if n.flops_per_sample == costs.full.flops)
    partitioned = {d: sum(held_by(b, d) for b in layout.partitionable) for d in depths}
    assert partitioned[4] == len(layout.partitionable)  # nodes.jsonl's blocks: the partitionable blocks held
    assert sorted(n.blocks for n in nodes) == sorted(partitioned[d] for d in depths)


@pytest.mark.slow  # eight rounds of 20 steps on three nodes
def test_depthfl_end_to_end_on_real_digits(tiny_config):
    tiny_config.update({"strategy": "depthfl", "capacity-profile": "1.0,0.5,0.25", "min-train-nodes": 3,
                        "min-available-nodes": 3, "dataset": "digits", "local-steps": 20, "base-width": 8,
                        "batch-size": 32, "num-server-rounds": 8, "eval-batch-size": 360, "run-name": "depthfl",
                        "head-norm": True})
    grid = run_inprocess(tiny_config, num_nodes=3)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {int(m.content["config"][DEPTH_EXITS]) for m in sent} >= {4}
    rows = read_metrics(Path(tiny_config["output-dir"]) / "depthfl")
    print(f"\ndigits depthfl: accuracy {[round(r['accuracy'], 3) for r in rows]}, exits "
          f"{[round(rows[-1][f'accuracy-exit-{k}'], 3) for k in range(1, 5)]}")
    assert rows[-1]["accuracy"] >= 0.8
    assert all(0.1 < rows[-1][f"accuracy-exit-{k}"] <= 1 for k in range(1, 5))  # every exit learns
    from simulations import report

    lines = report.tier_lines(Path(tiny_config["output-dir"]), {("main", "depthfl"): [
        report.Run("depthfl", "main", "depthfl", 0, report.Curve.from_rows(rows))]}, "exit")
    assert lines[0] == "## Accuracy per exit (final round)" and "| 1 (exit) | 2 (exit) |" in "\n".join(lines)
    late = lines[lines.index(report.LATE_TIERS["exit"][0]) + 4].split(" | ")  # late accuracy per exit, ensemble
    last_fifth = [r for r in rows if r.get("accuracy") is not None and r["round"] > 0.8 * rows[-1]["round"]]
    for k in (1, 4):
        assert float(late[k]) == pytest.approx(np.mean([r[f"accuracy-exit-{k}"] for r in last_fifth]), abs=5e-5)
    assert float(late[5].rstrip(" |")) == pytest.approx(np.mean([r["accuracy"] for r in last_fifth]), abs=5e-5)
    assert all(r["strategy"] == "depthfl" and r["replies-accepted"] == 3 for r in rows)
    assert np.isfinite([r["train-loss"] for r in rows]).all()
    # per exit, so that rounds of nodes with different exit counts compare: round 1's 20 steps start at
    # chance (ln 10 per exit) and fall; the sum over the exits was above it (4.58 here)
    assert rows[0]["train-loss"] < math.log(10)
