"""Issue 32: every method of the registry over one round skeleton; central DP as a wrapper over any of
them; settings a method does not read are refused; the ClientApp's behaviour comes from the table."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import identity_handler, node_hook
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.holders import holder_counts
from resist_fl.core.model import build_model
from resist_fl.core.model_cost import CostModel
from resist_fl.flower.array_codec import array_view
from resist_fl.flower.central_dp_strategy import CentrallyPrivate
from resist_fl.flower.method_factory import ModelParts, build
from resist_fl.flower.round_skeleton import SubModelStrategy
from resist_fl.node.method_hooks import DepthExits, OrderedDropoutWidths, SubNetwork, WidthSlice
from resist_fl.run.methods import METHODS, keys_read_by_some, readers
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess_grid import InProcessGrid

NODES = 4
PROFILE = "1.0,0.5,0.25,1.0"

echo_app = ClientApp()  # a node that returns what it received: a zero update, so the merge moves by the noise only


@echo_app.train()
def _echo(msg: Message, context) -> Message:
    metrics = MetricRecord({"num-examples": 10, "local-steps": 1})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)


@echo_app.query()
def _identity(msg: Message, context) -> Message:
    return identity_handler(msg, context)


def private_settings(name: str) -> RunSettings:
    return RunSettings(strategy=name, dp="central", weighting="uniform", model="preact_resnet18", base_width=8,
                       capacity_measure="blocks", capacity_profile=PROFILE, min_train_nodes=NODES,
                       min_available_nodes=NODES, dp_clip=1.0, dp_noise_multiplier=1.0,
                       **({"label_split": False} if "label-split" in METHODS[name].reads else {}))


def built_for(settings: RunSettings):
    spec = settings.model_spec(num_classes=10, in_channels=3)
    layout = BlockLayout.from_spec(spec, settings.stages())
    return build(settings, ModelParts(spec, layout, CostModel(spec, layout, 32)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_under_central_dp_through_the_wrapper(name):
    """The wrapper over each method: every message carries dp-clip, and with zero updates each element
    held by h nodes moves by noise of standard deviation z * C / h (z = C = 1), whatever the method."""
    settings = private_settings(name)
    grid = InProcessGrid(echo_app, num_nodes=NODES, run_config={"capacity-profile": PROFILE})
    built = built_for(settings).for_federation(grid)  # fedavg-small: the width its nodes fit
    strategy = built.strategy
    assert isinstance(strategy, CentrallyPrivate) and isinstance(strategy.strategy, SubModelStrategy)
    assert strategy.label == name
    state = build_model(built.model.spec).state_dict()
    initial = ArrayRecord({k: state[k] for k in built.model.layout.payload_keys()})
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), grid))
    assert len(messages) == NODES and all(m.content["config"]["dp-clip"] == 1.0 for m in messages)
    merged, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert metrics["replies-accepted"] == NODES and "train-loss" not in metrics
    inner = strategy.strategy
    counts = holder_counts({k: tuple(initial[k].shape) for k in initial},
                           {n: dict(p.holding) for n, p in inner.plans.items()})
    by_holders: dict[int, list[np.ndarray]] = {}
    for key, count in counts.items():
        if array_view(initial[key]).dtype.kind != "f":
            continue
        moved = array_view(merged[key]).astype(np.float64) - array_view(initial[key])
        count = np.broadcast_to(count, moved.shape)
        for h in np.unique(count):
            by_holders.setdefault(int(h), []).append(moved[count == h])
    checked = 0
    for h, parts in by_holders.items():
        values = np.concatenate(parts)
        if h == 0:
            assert np.all(values == 0)  # held by nobody: unchanged
        elif values.size >= 2000:
            assert values.std() == pytest.approx(1.0 / h, rel=0.08), (name, h)
            checked += 1
    assert checked >= 1
    report = strategy.round_report()
    assert report.privacy["epsilon"] > 0 and all(n.epsilon > 0 for n in report.nodes.values())


def test_width_methods_hold_elements_by_capacity_and_noise_follows_the_element_holders():
    """HeteroFL under DP: capacities 1, 0.5, 0.25, 1 give channels held by 4, 3 and 2 nodes."""
    built = built_for(private_settings("heterofl"))
    state = build_model(built.model.spec).state_dict()
    initial = ArrayRecord({k: state[k] for k in built.model.layout.payload_keys()})
    grid = InProcessGrid(echo_app, num_nodes=NODES, run_config={"capacity-profile": PROFILE})
    list(built.strategy.configure_train(1, initial, ConfigRecord({}), grid))
    counts = holder_counts({k: tuple(initial[k].shape) for k in initial},
                           {n: dict(p.holding) for n, p in built.strategy.strategy.plans.items()})
    assert {int(h) for c in counts.values() for h in np.unique(c)} >= {2, 3, 4}


@pytest.mark.parametrize("key", keys_read_by_some())
def test_a_setting_a_method_does_not_read_is_refused_for_every_such_method(key):
    value = {"server-lr": 0.5, "fjord-levels": "0.5,1.0", "label-split": False, "fedrolex-overlap": "0.5",
             "depthfl-distill": False, "allocation": "capacity", "min-blocks-per-site": 1, "inference-scaling": False,
             "warmup-rounds": 1, "width-rates": "1,0.5", "feddyn-alpha": 0.1, "privacy-min-holders": 2,
             "privacy-strict": True}[key]
    for name in METHODS:
        config = {"strategy": name, key: value, **({"model": "preact_resnet18"} if METHODS[name].preact_only else {})}
        if name in readers(key):
            RunSettings.from_run_config({**config, **({"privacy-min-holders": 2} if key == "privacy-strict" else {})})
        else:
            with pytest.raises(SettingsError, match=re.escape(f"{key} = {value!r}: strategy '{name}' does not use it")):
                RunSettings.from_run_config(config)


def test_the_client_apps_node_behaviour_comes_from_the_method_table():
    hooks = {name: type(node_hook(name)) for name in METHODS}
    assert hooks["resist"] is hooks["depth-prefix"] is hooks["fedavg"] is SubNetwork
    assert hooks["heterofl"] is hooks["fedrolex"] is hooks["fedavg-small"] is WidthSlice
    assert hooks["fjord"] is OrderedDropoutWidths
    assert hooks["depthfl"] is DepthExits


def test_no_strategy_module_branches_on_dp_or_a_method_name():
    """DP is the wrapper's; a method's name is the table's (the strategy modules read neither)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "resist_fl" / "flower"
    for module in ("resist.py", "fedavg.py", "width_sliced.py", "depthfl.py", "round_skeleton.py"):
        text = (root / module).read_text()
        assert "self.dp" not in text and "CentralDP" not in text, module
        assert not re.search(r"(settings\.strategy|\.label|\bstrategy) *(==|!=|in )", text), module


def test_the_run_config_reference_reads_the_method_table():
    """The `strategy` and `dp` entries of docs/run-config.md are written from the table, so which methods
    exist and which run under local DP cannot drift from what the settings enforce."""
    from resist_fl.run.methods import LOCAL_DP

    fields = RunSettings.model_fields
    strategy, dp = fields["strategy"].description, fields["dp"].description
    for name, method in METHODS.items():
        assert method.summary and f"`{name}` ({method.summary})" in strategy
    listed = re.search(r"by plain SGD: ([^)]*)\)", dp)[1]
    assert listed == ", ".join(f"`{m}`" for m in LOCAL_DP) and set(LOCAL_DP) == {
        name for name, m in METHODS.items() if "local" in m.dp}
    assert "`fjord`" not in listed and "`depthfl`" not in listed and "`resist`" in listed
    for name in METHODS:  # what the reference says is what the settings do
        config = {"strategy": name, "dp": "local", "norm": "groupnorm"}
        if name not in LOCAL_DP:
            with pytest.raises(SettingsError, match="dp = 'local'"):
                RunSettings.from_run_config(config)


def test_depthfl_names_its_exits_for_the_central_evaluation_through_the_dp_wrapper():
    """The ServerApp scores what the strategy names (no model-type check): DepthFL's exits, the others none;
    the prediction ``""`` is the model's own output (for DepthFL the mean of its exits)."""
    import torch

    for name, expected in (("depthfl", ["", "exit-1", "exit-2", "exit-3", "exit-4"]), ("resist", [""]),
                           ("fjord", [""])):
        built = built_for(private_settings(name))
        assert isinstance(built.strategy, CentrallyPrivate)
        model = build_model(built.model.spec).eval()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs = built.strategy.evaluation_outputs(model)(images)
            assert list(outputs) == expected and torch.equal(outputs[""], model(images))
            for k in range(1, len(expected)):
                assert torch.equal(outputs[f"exit-{k}"], model.exit_logits(images)[k - 1])
