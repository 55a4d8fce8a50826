"""FedDyn, DepthFL's server optimiser (``feddyn-alpha``): the server's correction against the authors'
formula, the node's regulariser and state against a hand computation, a round through the strategy,
the state a node keeps across rounds through the real ClientApp, and the settings it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.feddyn import FedDynServer
from resist_fl.core.model import build_model
from resist_fl.core.model_cost import CostModel
from resist_fl.flower.array_codec import array_view
from resist_fl.flower.client_side import ContextMemory
from resist_fl.flower.depthfl import DepthFL, held_by
from resist_fl.flower.message_keys import DEPTH_EXITS, FEDDYN_ALPHA
from resist_fl.node.feddyn_regularizer import STATE_KEY, FedDynRegularizer
from resist_fl.node.method_hooks import DepthExits
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess
from simulations.inprocess_grid import InProcessGrid
from tests.flower.test_depthfl import SPEC, shift_app


def authors_aggregate(results, origin, h, is_weight, alpha, num_clients):
    """The authors' ``aggregate`` (baselines/depthfl/depthfl/strategy.py lines 95-136), transcribed:
    lists of arrays by position, ``None`` where a client did not return a tensor."""
    new = []
    for i, start in enumerate(origin):
        held = [r[i] for r in results if r[i] is not None]
        if not held:
            new.append(start)
            continue
        weight = sum(held) / len(held)
        h[i] = h[i] - alpha * len(held) * (weight - start) / num_clients
        new.append(weight - h[i] / alpha if is_weight[i] else weight)
    return new


def test_the_server_correction_is_the_authors_aggregate_over_two_rounds():
    rng = np.random.default_rng(0)
    keys = ["conv.weight", "bn.running_mean", "fc.bias"]
    origin = [rng.normal(size=(3, 2)), rng.normal(size=4), rng.normal(size=2)]
    server = FedDynServer(0.1, ["conv.weight", "fc.bias"])
    h = [np.zeros_like(a) for a in origin]
    current = dict(zip(keys, origin))
    for _ in range(2):
        # three clients: all hold conv and bn, one holds fc
        results = [[current["conv.weight"] + rng.normal(size=(3, 2)), current["bn.running_mean"] + 1.0,
                    current["fc.bias"] + rng.normal(size=2) if c == 0 else None] for c in range(3)]
        expected = authors_aggregate(results, [current[k] for k in keys], h, [True, False, True], 0.1, 10)
        mean = {k: np.mean([r[i] for r in results if r[i] is not None], axis=0) for i, k in enumerate(keys)}
        got = server.correct(current, mean, {"conv.weight": 3, "bn.running_mean": 3, "fc.bias": 1}, 10)
        for i, k in enumerate(keys):
            np.testing.assert_allclose(got[k], expected[i], rtol=1e-12, atol=1e-12)
        current = got
    np.testing.assert_allclose(server.h["conv.weight"], h[0], rtol=1e-12)
    assert "bn.running_mean" not in server.h  # only trainable tensors are corrected
    with pytest.raises(ValueError, match="alpha"):
        FedDynServer(0.0, keys)


def test_the_node_regulariser_and_its_state_are_the_authors_terms():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    alpha = 0.3
    stored = {"weight": np.full((2, 3), 0.5, np.float32), "other.layer": np.ones(4, np.float32)}
    reg = FedDynRegularizer(model, alpha, stored)
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(0.2)
        model.bias.sub_(0.1)
    by_hand = sum(-(p.detach() * torch.as_tensor(stored.get(k, np.zeros(tuple(p.shape), np.float32)))).sum()
                  + alpha / 2 * ((p.detach() - w0[k]) ** 2).sum() for k, p in model.named_parameters())
    penalty = reg.penalty()
    assert float(penalty.detach()) == pytest.approx(float(by_hand), rel=1e-6)
    penalty.backward()  # d/dw: -h + alpha (w - w0)
    torch.testing.assert_close(model.weight.grad, -torch.full((2, 3), 0.5) + alpha * 0.2 * torch.ones(2, 3))
    torch.testing.assert_close(model.bias.grad, alpha * -0.1 * torch.ones(2))
    state = reg.updated_state()
    np.testing.assert_allclose(state["weight"], 0.5 - alpha * 0.2, rtol=1e-6)
    np.testing.assert_allclose(state["bias"], alpha * 0.1, rtol=1e-5)
    np.testing.assert_array_equal(state["other.layer"], 1.0)  # a parameter it did not hold this round is kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the model moves there after the regulariser")
def test_the_regulariser_follows_the_model_to_the_gpu():
    """The ClientApp builds the regulariser on the received (CPU) model; training then moves the model to the
    GPU in place: the penalty and the state are computed there, with the same values as on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    stored = {"weight": np.full((2, 3), 0.5, np.float32)}
    on_cpu, reg = FedDynRegularizer(model, 0.3, stored), FedDynRegularizer(model, 0.3, stored)
    with torch.no_grad():
        model.weight.add_(0.2)
    expected, expected_state = on_cpu.penalty().item(), on_cpu.updated_state()
    model.to("cuda")
    assert reg.penalty().device.type == "cuda" and reg.penalty().item() == pytest.approx(expected, rel=1e-6)
    for key, value in reg.updated_state().items():
        np.testing.assert_allclose(value, expected_state[key], rtol=1e-6)


def test_context_memory_keeps_arrays_across_rounds_in_flowers_state():
    state = RecordDict()
    memory = ContextMemory(state)
    assert memory.load("x") == {}
    memory.save("x", {"a.weight": np.arange(3, dtype=np.float32)})
    assert isinstance(state["x"], ArrayRecord)
    np.testing.assert_array_equal(ContextMemory(state).load("x")["a.weight"], [0, 1, 2])


def test_the_hook_adds_the_regulariser_only_when_the_message_names_alpha():
    model = build_model(SPEC)
    config = {DEPTH_EXITS: 4, "distill-weight": 0.5}
    assert DepthExits().local_training(model, SPEC, config, 0, torch.zeros(3)).after_training is None
    memory = ContextMemory(RecordDict())
    local = DepthExits().local_training(model, SPEC, {**config, FEDDYN_ALPHA: 0.1}, 0, torch.zeros(3), memory)
    assert local.loss_terms == 4  # the reply's train-loss is per exit, as without FedDyn
    local.after_training()
    params = dict(model.named_parameters())
    assert set(memory.load(STATE_KEY)) == set(params)  # untrained: h stays 0
    assert all(not v.any() for v in memory.load(STATE_KEY).values())


def test_a_feddyn_round_corrects_the_mean_by_the_holders_share_of_the_clients():
    """The shift app returns what it received plus its depth: after one round h = -alpha (c/N)(m - x), so
    the new value is m + (c/N)(m - x) for a trainable tensor held by c of the N = 3 nodes."""
    profile = "1.0,0.1,0.1"
    layout = BlockLayout.from_spec(SPEC)
    costs = CostModel(SPEC, layout, 16)
    settings = RunSettings.from_run_config({"strategy": "depthfl", "capacity-profile": profile, "min-train-nodes": 3,
                                            "min-available-nodes": 3, "model": "preact_resnet18",
                                            "feddyn-alpha": 0.1})
    strategy = DepthFL(layout, settings, costs=costs)
    state = build_model(SPEC).state_dict()
    initial = ArrayRecord({k: state[k] for k in layout.payload_keys()})
    grid = InProcessGrid(shift_app, num_nodes=3, run_config={"capacity-profile": profile})
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), grid))
    assert {m.content["config"][FEDDYN_ALPHA] for m in messages} == {0.1}
    small = costs.max_exits(0.1, "flops")
    merged, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))

    def moved(key):
        return float(np.mean(array_view(merged[key]).astype(np.float64) - array_view(initial[key])))

    everyone = (small + small + 4) / 3
    assert moved("exits.0.fc.weight") == pytest.approx(everyone * (1 + 3 / 3))
    assert moved("layer4.0.conv1.weight") == pytest.approx(4.0 * (1 + 1 / 3))
    assert held_by("layer4.0.conv1.weight", 4) and not held_by("layer4.0.conv1.weight", small)
    assert strategy.feddyn.trainable == set(layout.payload_keys())  # batch statistics: every payload key trains


def test_a_feddyn_run_trains_and_every_node_keeps_its_state(tiny_config):
    tiny_config.update({"strategy": "depthfl", "feddyn-alpha": 0.1, "capacity-profile": "1.0,0.5,0.25",
                        "min-train-nodes": 3, "min-available-nodes": 3, "dataset": "digits", "local-steps": 10,
                        "base-width": 8, "batch-size": 32, "num-server-rounds": 3, "eval-batch-size": 360,
                        "run-name": "feddyn", "head-norm": True})
    grid = run_inprocess(tiny_config, num_nodes=3)
    rows = read_metrics(Path(tiny_config["output-dir"]) / "feddyn")
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[-1]["accuracy"] > 0.3  # chance: 0.1
    for node in grid.node_ids:
        kept = ContextMemory(grid.context(node).state).load(STATE_KEY)
        assert kept and any(np.abs(v).max() > 0 for v in kept.values())  # h moved from zero


@pytest.mark.parametrize("extra", [{"dp": "central", "weighting": "uniform"}, {"resume": True, "run-name": "r"},
                                   {"server-lr": 0.5}])
def test_feddyn_refuses_what_its_memory_or_its_step_cannot_honour(extra):
    with pytest.raises(SettingsError, match="feddyn-alpha"):
        RunSettings.from_run_config({"strategy": "depthfl", "feddyn-alpha": 0.1, **extra})
    with pytest.raises(SettingsError, match="feddyn-alpha"):
        RunSettings.from_run_config({"strategy": "heterofl", "feddyn-alpha": 0.1})
