"""client-eval: the ServerApp's per-client figures equal a direct evaluation of the saved global model
on every client's label distribution's share of the test set (real digits, Dirichlet label skew)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resist_fl.data import EvalBatches, load_partition, load_test_set, normalization
from resist_fl.run.outputs import load_model, read_metrics, run_directory
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess

NODES = 10


def test_per_client_accuracy_equals_a_direct_evaluation_on_each_clients_share(tiny_config):
    config = {**tiny_config, "dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
              "client-eval": True, "fraction-train": 0.3, "min-train-nodes": 3, "min-available-nodes": NODES,
              "eval-batch-size": 360, "num-server-rounds": 2, "local-steps": 4, "augment": "none"}
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
