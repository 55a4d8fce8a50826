"""client-eval: the ServerApp's per-client figures equal a direct evaluation of the saved global model
on every client's label distribution's share of the test set (real digits, Dirichlet label skew)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.width_slicing import key_groups, prefix_indices, slice_state, sliced_spec
from resist_fl.data import EvalBatches, load_partition, load_test_set, normalization
from resist_fl.run.outputs import load_model, read_metrics, run_directory
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess

NODES = 10


def test_per_client_accuracy_equals_a_direct_evaluation_on_each_clients_share(tiny_config):
    config = {**tiny_config, "dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
              "client-eval": True, "fraction-train": 0.3, "min-train-nodes": 3, "min-available-nodes": NODES,
              "eval-batch-size": 360, "num-server-rounds": 2, "local-steps": 4, "augment": "none",
              "amp": False}  # the direct evaluation below is fp32
    run_inprocess(config, num_nodes=NODES)
    run_dir = run_directory(config["output-dir"], config["run-name"], "")
    rows = read_metrics(run_dir)
    assert all({"client-accuracy-mean", "client-accuracy-worst10", "client-accuracy-min",
                "client-accuracy-std"} <= set(r) for r in rows)
    model = load_model(run_dir / "model.pt")
    test = load_test_set("digits")
    predictions = []
    with torch.no_grad():
        for images, _ in EvalBatches(test, 360, normalization=normalization("digits")):
            predictions.append(model(images).argmax(1).numpy())
    right = np.concatenate(predictions) == np.asarray(test.labels)
    assert rows[-1]["accuracy"] == pytest.approx(right.mean())
    per_label = np.bincount(test.labels, minlength=10)
    direct = []
    for pid in range(NODES):  # all ten clients, sampled or not
        mix = np.bincount(load_partition("digits", pid, NODES, partitioner="dirichlet", alpha=0.3, seed=0).labels,
                          minlength=10)
        weight = mix[test.labels] / per_label[test.labels]
        direct.append((weight * right).sum() / weight.sum())
    direct = np.sort(direct)
    assert rows[-1]["client-accuracy-mean"] == pytest.approx(direct.mean())
    assert rows[-1]["client-accuracy-min"] == pytest.approx(direct[0])
    assert rows[-1]["client-accuracy-worst10"] == pytest.approx(direct[:math.ceil(NODES / 10)].mean())
    assert rows[-1]["client-accuracy-std"] == pytest.approx(direct.std())
    assert direct.std() > 0  # label skew: clients differ


def test_client_eval_is_refused_under_dp(tiny_config):
    with pytest.raises(SettingsError, match="client-eval = true: .* the privacy guarantee does not cover"):
        RunSettings.from_run_config({**tiny_config, "dp": "central", "weighting": "uniform", "client-eval": True})


def test_per_client_accuracy_of_the_tier_each_node_would_run(tiny_config):
    """HeteroFL: each client on its label mix with the width its node's capacity gets (the prefix)."""
    profile = (1.0, 0.5, 0.25)
    config = {**tiny_config, "strategy": "heterofl", "dataset": "digits", "partitioner": "dirichlet",
              "dirichlet-alpha": 0.3, "client-eval": True, "fraction-train": 0.5, "min-train-nodes": 3,
              "min-available-nodes": 6, "capacity-profile": ",".join(map(str, profile)),
              "capacity-measure": "blocks", "width-rates": "1,0.5,0.25", "eval-batch-size": 360,
              "num-server-rounds": 1, "local-steps": 4, "augment": "none",
              "amp": False, "base-width": 8}
    run_inprocess(config, num_nodes=6)
    run_dir = run_directory(config["output-dir"], config["run-name"], "")
    last = read_metrics(run_dir)[-1]
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    full = ModelSpec.from_dict({**saved["model_spec"], "depths": tuple(saved["model_spec"]["depths"])})
    state = {k: v.numpy() for k, v in saved["state_dict"].items()}
    test = load_test_set("digits")
    per_label = np.bincount(test.labels, minlength=10)
    direct = []
    for pid in range(6):  # capacity-measure 'blocks' with rates = the capacities: a node's tier is its capacity
        rate = profile[pid % 3]
        model = build_model(sliced_spec(full, rate)).eval()
        cut = slice_state(state, key_groups(full, list(state)), prefix_indices(full, rate))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in cut.items()})
        with torch.no_grad():
            predicted = torch.cat([model(x).argmax(1) for x, _ in EvalBatches(test, 360,
                                                                               normalization=normalization("digits"))])
        right = predicted.numpy() == np.asarray(test.labels)
        mix = np.bincount(load_partition("digits", pid, 6, partitioner="dirichlet", alpha=0.3, seed=0).labels,
                          minlength=10)
        weight = mix[test.labels] / per_label[test.labels]
        direct.append((weight * right).sum() / weight.sum())
    assert last["client-tier-accuracy-mean"] == pytest.approx(np.mean(direct))
    assert last["client-tier-accuracy-min"] == pytest.approx(np.min(direct))
    assert last["client-tier-accuracy-worst10"] == pytest.approx(np.sort(direct)[0])  # 10 % of 6 clients: one


def clients_accuracy(model_of_partition, num_partitions: int) -> list[float]:
    """Each client's accuracy on its label mix with the model ``model_of_partition(pid)`` (digits, alpha 0.3)."""
    test = load_test_set("digits")
    per_label = np.bincount(test.labels, minlength=10)
    accuracy = []
    for pid in range(num_partitions):
        model = model_of_partition(pid).eval()
        with torch.no_grad():
            predicted = torch.cat([model(x).argmax(1) for x, _ in EvalBatches(test, 360,
                                                                               normalization=normalization("digits"))])
        right = predicted.numpy() == np.asarray(test.labels)
        mix = np.bincount(load_partition("digits", pid, num_partitions, partitioner="dirichlet", alpha=0.3,
                                         seed=0).labels, minlength=10)
        weight = mix[test.labels] / per_label[test.labels]
        accuracy.append((weight * right).sum() / weight.sum())
    return accuracy


@pytest.mark.parametrize("strategy", ["depthfl", "depth-prefix"])
def test_per_client_accuracy_of_the_depth_methods_tiers(tiny_config, strategy):
    """DepthFL: a client runs the first stages its node's capacity allows with their exits (the mean of
    those exits); the depth prefix: the first blocks it allows, as trained (residual scale 1)."""
    from dataclasses import replace

    from resist_fl.core.model_cost import max_depth
    from resist_fl.core.decomposition import BlockLayout

    profile = (1.0, 0.5, 0.25)
    config = {**tiny_config, "strategy": strategy, "dataset": "digits", "partitioner": "dirichlet",
              "dirichlet-alpha": 0.3, "client-eval": True, "fraction-train": 0.5, "min-train-nodes": 3,
              "min-available-nodes": 6, "capacity-profile": ",".join(map(str, profile)),
              "capacity-measure": "blocks", "eval-batch-size": 360, "num-server-rounds": 1, "local-steps": 4,
              "augment": "none",
              "amp": False, "base-width": 8, "stage-depths": "1,1,4,1"}
    run_inprocess(config, num_nodes=6)
    run_dir = run_directory(config["output-dir"], config["run-name"], "")
    last = read_metrics(run_dir)[-1]
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    full = ModelSpec.from_dict({**saved["model_spec"], "depths": tuple(saved["model_spec"]["depths"])})
    state = saved["state_dict"]
    layout = BlockLayout.from_spec(full)

    def model_of(pid: int) -> torch.nn.Module:
        capacity = profile[pid % 3]
        if strategy == "depthfl":  # capacity 'blocks': the fraction of the four stages
            model = build_model(replace(full, exits=int(capacity * 4)))
        else:
            model = layout.build_subnetwork(full, layout.partitionable[:max_depth(capacity, len(layout.partitionable))])
        own = model.state_dict()
        model.load_state_dict({k: state[k] if not k.endswith("residual_scale") else own[k] for k in own})
        return model

    direct = clients_accuracy(model_of, 6)
    assert last["client-tier-accuracy-mean"] == pytest.approx(np.mean(direct))
    assert last["client-tier-accuracy-min"] == pytest.approx(np.min(direct))
    assert last["client-accuracy-mean"] != pytest.approx(last["client-tier-accuracy-mean"])  # the tiers differ
