"""HeteroFL and FedRolex end to end on the in-process grid through the project's ServerApp and
ClientApp: each node gets the largest width its FLOP budget allows, receives and returns only that
slice (global names, sliced shapes), nodes.jsonl records what it cost, the tiers are evaluated,
a stopped run resumes bit-identically, and both learn the real digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import server_app.app as server_app
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.model_cost import CostModel
from resist_fl.core.width_slicing import sliced_spec
from resist_fl.flower.width_sliced import WIDTH_RATE, WIDTH_SCALER
from resist_fl.run.methods import METHODS
from resist_fl.run.outputs import load_model, read_metrics
from simulations.inprocess import run_inprocess

GRID = "1,0.5,0.25,0.125,0.0625"  # HeteroFL's own width grid (the full-budget default: tests/flower/test_budgets.py)
HETERO = {"capacity-profile": "1.0,0.5,0.25", "min-train-nodes": 3, "min-available-nodes": 3}


def widths(strategy: str) -> dict:
    """HeteroFL's grid for a method that reads ``width-rates`` (the others refuse the key)."""
    return {"width-rates": GRID} if "width-rates" in METHODS[strategy].reads else {}
SPEC = ModelSpec(depths=(1, 1, 4, 1), base_width=8, num_classes=10)  # the tiny config's model


def run_dir(config: dict) -> Path:
    return Path(config["output-dir"]) / config["run-name"]


@pytest.mark.parametrize("strategy", ["heterofl", "fedrolex"])
def test_each_node_trains_the_widest_slice_its_budget_allows(tiny_config, strategy):
    tiny_config.update(HETERO, strategy=strategy, **widths(strategy), **{"num-server-rounds": 2})
    grid = run_inprocess(tiny_config, num_nodes=3)
    costs = CostModel(SPEC, BlockLayout.from_spec(SPEC), 32)
    nodes = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    assert [(n["partition"], n["width-rate"]) for n in nodes] == [(0, 1.0), (1, 0.5), (2, 0.25)] * 2
    for n in nodes:
        cost = costs.width_cost(n["width-rate"])
        assert (n["flops-per-sample"], n["params"], n["over-capacity"]) == (cost.flops, cost.params, 0)
        assert n["flops-per-sample"] <= n["capacity"] * costs.full.flops and n["status"] == "accepted"
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    for message in sent:
        rate = message.content["config"][WIDTH_RATE]
        assert message.content["config"][WIDTH_SCALER] is (strategy == "heterofl")
        small = build_model(sliced_spec(SPEC, rate)).state_dict()
        assert {k: tuple(a.shape) for k, a in message.content["arrays"].items()} == \
            {k: tuple(v.shape) for k, v in small.items() if not k.endswith("residual_scale")}
    rows = read_metrics(run_dir(tiny_config))
    assert all(r["replies-accepted"] == 3 and r["strategy"] == strategy for r in rows)
    assert {"accuracy-width-50", "accuracy-width-25"} <= set(rows[-1])
    assert rows[0]["bytes-down"] == sum(m.content["arrays"].count_bytes() for m in sent[:3])


def test_fedrolex_rolls_its_window_and_heterofl_keeps_its_prefix(tiny_config):
    tiny_config.update(HETERO, strategy="fedrolex", **widths("fedrolex"), **{"num-server-rounds": 2})
    grid = run_inprocess(tiny_config, num_nodes=3)
    half = [m for m in grid.sent if m.metadata.message_type == "train" and m.content["config"][WIDTH_RATE] == 0.5]
    first, second = (m.content["arrays"]["linear.weight"].numpy() for m in half)
    assert not np.array_equal(first, second)  # round 2's window starts one channel later


@pytest.mark.slow  # six strategies x two runs each
@pytest.mark.parametrize("strategy", ["heterofl", "fedrolex", "fjord", "depth-prefix", "fedavg-small", "depthfl"])
def test_a_stopped_sub_model_run_resumes_bit_identically(tiny_config, monkeypatch, strategy):
    base = {**tiny_config, **HETERO, **widths(strategy), "strategy": strategy, "num-server-rounds": 3,
            "lr-schedule": "constant",
            "local-steps": 2}
    whole = {**base, "run-name": "whole"}
    run_inprocess(whole, num_nodes=3)
    evaluate = server_app.CentralEvaluation.__call__

    def stop(self, run_round, state, widths):
        if run_round == 2:
            raise RuntimeError("stopped")
        return evaluate(self, run_round, state, widths)

    stopped = {**base, "run-name": "stopped"}
    monkeypatch.setattr(server_app.CentralEvaluation, "__call__", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        run_inprocess(stopped, num_nodes=3)
    monkeypatch.setattr(server_app.CentralEvaluation, "__call__", evaluate)
    run_inprocess({**stopped, "resume": True}, num_nodes=3)
    a, b = (torch.load(run_dir(c) / "model.pt", weights_only=True)["state_dict"] for c in (whole, stopped))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the widths the global model is evaluated at come from the round reports, kept in nodes.jsonl across
    # the stop: the resumed run's last evaluation is the whole run's, tier by tier
    last = [{k: v for k, v in read_metrics(run_dir(c))[-1].items() if k.startswith("accuracy")}
            for c in (whole, stopped)]
    assert last[0] == last[1]
    held = {r["global-width"] for r in read_metrics(run_dir(whole), "nodes.jsonl")}
    assert (held == {None}) == (strategy in ("depth-prefix", "fedavg-small", "depthfl"))
    assert {f"accuracy-width-{round(100 * w, 2):g}" for w in held if w is not None and w < 1} \
        == {k for k in last[0] if k.startswith("accuracy-width-")}


@pytest.mark.slow  # six rounds of 20 steps on three nodes, per method
@pytest.mark.parametrize("strategy, rates", [("heterofl", GRID), ("fedrolex", GRID), ("heterofl", "channels")])
def test_width_methods_learn_the_real_digits(tiny_config, digits_npz, strategy, rates):
    """Also at ``channels`` (every node its largest whole-channel width), on real images."""
    tiny_config.update(HETERO, strategy=strategy, dataset="npz", **{
        "data-path": digits_npz, "local-steps": 20, "batch-size": 32, "num-server-rounds": 6,
        "eval-batch-size": 360, "run-name": strategy, "width-rates": rates})
    run_inprocess(tiny_config, num_nodes=3)
    rows = read_metrics(run_dir(tiny_config))
    tiers = {k: round(v, 3) for k, v in rows[-1].items() if k.startswith("accuracy-width-")}
    print(f"\ndigits {strategy} ({rates}): accuracy {[round(r['accuracy'], 3) for r in rows]}, tiers {tiers}")
    assert rows[-1]["accuracy"] >= 0.8  # floor: 10 classes, 6 short rounds, a third of the nodes at full width


def test_width_methods_need_the_pre_activation_family():
    from resist_fl.run.settings import RunSettings, SettingsError

    for name in ("heterofl", "depthfl"):
        with pytest.raises(SettingsError, match=f"{name} builds on the pre-activation family"):
            RunSettings.from_run_config({"strategy": name, "model": "torchvision_resnet18"})
    with pytest.raises(SettingsError, match="width-rates = '0,1'"):
        RunSettings.from_run_config({"strategy": "fedrolex", "width-rates": "0,1"})


# -- depth prefix: the static counterpart of ResIST's random decomposition ---------------------------

def test_depth_prefix_always_train_the_first_blocks_that_fit(tiny_config):
    tiny_config.update(HETERO, strategy="depth-prefix", **{"stage-depths": "1,1,9,1", "base-width": 8,
                                                          "capacity-measure": "blocks", "num-server-rounds": 2})
    grid = run_inprocess(tiny_config, num_nodes=3)
    blocks = [f"layer3.{i}" for i in range(1, 9)]
    sent = {m.metadata.dst_node_id: list(m.content["config"]["blocks"])
            for m in grid.sent if m.metadata.message_type == "train"}
    assert sorted(sent.values(), key=len) == [blocks[:2], blocks[:4], blocks]  # 0.25 / 0.5 / 1.0 of 8 blocks
    rows = read_metrics(run_dir(tiny_config))
    assert all(r["strategy"] == "depth-prefix" and r["replies-accepted"] == 3 for r in rows)
    nodes = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    assert [(n["blocks"], n["max-blocks"], n["over-capacity"]) for n in nodes] == [(8, 8, 0), (4, 4, 0), (2, 2, 0)] * 2
    # evaluated as a depth method evaluates: every block at the residual scale it trained with, not ResIST's
    assert all(r["inference-scale"] == 1.0 for r in rows)
    model = load_model(run_dir(tiny_config) / "model.pt")
    assert {float(model.get_submodule(b).residual_scale) for b in blocks} == {1.0}


def test_resists_floor_is_flagged_under_a_flop_budget(tiny_config):
    """With 3 partitionable blocks the shared layers cost ~70 % of the model: a node of capacity
    0.25 cannot be given a ResIST sub-network within its FLOPs; the row says so."""
    tiny_config.update(HETERO, **{"num-server-rounds": 1})
    run_inprocess(tiny_config, num_nodes=3)
    nodes = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    assert [n["over-capacity"] for n in nodes] == [0, 1, 1] and all(n["blocks"] >= 1 for n in nodes)


def test_target_accuracy_stops_the_run_and_is_recorded(tiny_config):
    import json

    tiny_config.update({"num-server-rounds": 6, "target-accuracy": 0.01})
    run_inprocess(tiny_config, num_nodes=2)
    rows = read_metrics(run_dir(tiny_config))
    summary = json.loads((run_dir(tiny_config) / "summary.json").read_text())
    assert [r["round"] for r in rows] == [1]
    assert (summary["target-reached-round"], summary["rounds"], summary["target-accuracy"]) == (1, 1, 0.01)
    assert (run_dir(tiny_config) / "model.pt").exists()


def test_fedavg_small_trains_the_one_width_the_weakest_node_fits(tiny_config):
    tiny_config.update(HETERO, strategy="fedavg-small", **widths("fedavg-small"), **{"num-server-rounds": 2})
    grid = run_inprocess(tiny_config, num_nodes=3)
    nodes = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    assert {n["width-rate"] for n in nodes} == {0.25} and all(n["over-capacity"] == 0 for n in nodes)
    saved = torch.load(run_dir(tiny_config) / "model.pt", weights_only=True)
    assert saved["model_spec"]["base_width"] == 2  # the global model is the width-1/4 model
    small = build_model(sliced_spec(SPEC, 0.25)).state_dict()
    for message in (m for m in grid.sent if m.metadata.message_type == "train"):
        assert message.content["config"][WIDTH_RATE] == 0.25
        assert {k: tuple(a.shape) for k, a in message.content["arrays"].items()} == \
            {k: tuple(v.shape) for k, v in small.items() if not k.endswith("residual_scale")}
    assert read_metrics(run_dir(tiny_config))[-1]["strategy"] == "fedavg-small"


@pytest.mark.parametrize("profile", ["", "1.0,0.5,0.25"])
def test_fedavg_small_fits_the_weakest_capacity_the_connected_nodes_declare(tiny_config, caplog, profile):
    """The width comes from the sampler once the nodes are there: the weakest capacity the connected nodes
    declare (a deployment's node config over their profile entry; no profile needed), so a node that
    says less than the profile narrows the model instead of training over its budget."""
    tiny_config.update(HETERO, strategy="fedavg-small", **widths("fedavg-small"),
                       **{"num-server-rounds": 1, "capacity-profile": profile})
    declared = [1.0, 0.5, 0.05]
    nodes = [{"partition-id": i, "num-partitions": 3, "capacity": c} for i, c in enumerate(declared)]
    run_inprocess(tiny_config, num_nodes=3, node_configs=nodes)
    rows = {n["partition"]: n for n in read_metrics(run_dir(tiny_config), "nodes.jsonl")}
    (width,) = {r["width-rate"] for r in rows.values()}  # one width for all, of HeteroFL's grid
    assert width in (0.125, 0.0625)  # narrower than the profile's weakest (0.25) allows: node 2 said 0.05
    assert [rows[p]["capacity"] for p in range(3)] == declared and all(r["over-capacity"] == 0 for r in rows.values())
    assert rows[2]["budget-used"] <= 1.0
    assert "the weakest capacity is 0.05" in caplog.text
    saved = torch.load(run_dir(tiny_config) / "model.pt", weights_only=True)
    assert saved["model_spec"]["base_width"] == max(1, round(SPEC.base_width * width))


def test_fedavg_small_under_dynamic_capacities_fits_the_weakest_draw(tiny_config, caplog):
    """Under capacity-mode='dynamic' any node may be drawn the profile's weakest capacity in any round, so the
    one width fits that draw even though every connected node declares 1.0: no node-round is over its budget."""
    tiny_config.update(HETERO, strategy="fedavg-small", **widths("fedavg-small"),
                       **{"num-server-rounds": 2, "capacity-mode": "dynamic"})
    nodes = [{"partition-id": i, "num-partitions": 3, "capacity": 1.0} for i in range(3)]
    run_inprocess(tiny_config, num_nodes=3, node_configs=nodes)
    rows = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    assert {r["width-rate"] for r in rows} == {0.25} and all(r["over-capacity"] == 0 for r in rows)
    assert {r["capacity"] for r in rows} <= {1.0, 0.5, 0.25}  # the draws
    assert "the weakest capacity is 0.25" in caplog.text


def test_a_resumed_fedavg_small_keeps_its_width_whoever_connects(tiny_config, crash_at_round, caplog):
    """The checkpoint holds the width-1/4 model; after the stop a node declaring 0.05 connects: the resumed
    run keeps the model it started with (that node trains over its budget, with a WARNING), and goes on to
    the model a whole run would give."""
    tiny_config.update(HETERO, strategy="fedavg-small", **widths("fedavg-small"), **{"num-server-rounds": 2})
    crash_at_round(tiny_config, 3, 2)
    nodes = [{"partition-id": i, "num-partitions": 3, **({"capacity": 0.05} if i == 2 else {})} for i in range(3)]
    run_inprocess({**tiny_config, "resume": True}, num_nodes=3, node_configs=nodes)
    assert "resuming with the width-0.25 model the run started with" in caplog.text
    assert "has capacity 0.05, below what its width 0.25 costs" in caplog.text
    rows = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    assert [r["round"] for r in read_metrics(run_dir(tiny_config))] == [1, 2]
    assert {r["width-rate"] for r in rows} == {0.25}
    assert [r["over-capacity"] for r in rows if r["round"] == 2] == [0, 0, 1]


def test_a_resume_onto_a_model_of_other_shapes_is_refused_before_anything_is_rewritten(tiny_config, crash_at_round):
    from resist_fl.flower.fedavg import ScreenedFedAvg
    from resist_fl.flower.round_recorder import RoundRecorder

    tiny_config.update({"strategy": "fedavg", "num-server-rounds": 2})
    crash_at_round(tiny_config, 2, 2)
    directory = run_dir(tiny_config)
    saved = json.loads((directory / "run_config.json").read_text())
    layout = BlockLayout.from_spec(SPEC)
    recorder = RoundRecorder(ScreenedFedAvg(capacity_measure="blocks"), layout, directory,
                             run_config={**saved["run_config"], "resume": True}, num_rounds=2, resume=True)
    narrower = build_model(sliced_spec(SPEC, 0.5)).state_dict()
    before = (directory / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"resume: the checkpoint's .* has shape .* but this run's model has"):
        recorder.check_resumable(narrower)
    recorder.check_resumable(build_model(SPEC).state_dict())  # the same model: nothing to say
    assert (directory / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("strategy", ["heterofl", "fedrolex", "fedavg-small"])
def test_per_layer_widths_fill_each_budget_and_travel_as_their_rate(tiny_config, strategy):
    """``width-rates='layers'`` (HeteroFL's ceil(r x C) per layer): each node gets the largest such width
    within its FLOPs, a model whose stages need not keep the 1:2:4:8 ratios, built by the node from the
    rate in its message (training and evaluation)."""
    from resist_fl.run.settings import RunSettings

    tiny_config.update(HETERO, strategy=strategy, **{"width-rates": "layers", "capacity-measure": "flops",
                                                     "capacity-profile": "1.0,0.5,0.3", "num-server-rounds": 2})
    if strategy == "fedavg-small":  # the one width method whose nodes evaluate (the others: centrally only)
        tiny_config["fraction-evaluate"] = 1.0
    grid = run_inprocess(tiny_config, num_nodes=3)
    costs = CostModel(SPEC, BlockLayout.from_spec(SPEC), 32)
    layers = RunSettings(strategy=strategy, width_rates="layers", base_width=8).rates()
    nodes = read_metrics(run_dir(tiny_config), "nodes.jsonl")
    weakest = min(n["capacity"] for n in nodes)
    for n in nodes:
        budget = (weakest if strategy == "fedavg-small" else n["capacity"]) * costs.full.flops
        assert n["width-rate"] == costs.max_rate(budget / costs.full.flops, "flops", layers)
        assert costs.width_cost(n["width-rate"]).flops <= budget * (1 + 1e-9) and n["status"] == "accepted"
    if strategy != "fedavg-small":
        assert any(sliced_spec(SPEC, n["width-rate"]).stage_widths for n in nodes)  # off the model's ratios
    for message in (m for m in grid.sent if m.metadata.message_type in ("train", "evaluate")):
        small = build_model(sliced_spec(SPEC, message.content["config"][WIDTH_RATE])).state_dict()
        assert {k: tuple(a.shape) for k, a in message.content["arrays"].items()} == \
            {k: tuple(v.shape) for k, v in small.items() if not k.endswith("residual_scale")}
    rows = read_metrics(run_dir(tiny_config))
    assert all(r["replies-accepted"] == 3 for r in rows) and rows[-1]["accuracy"] is not None
