"""Accuracy at equal cost: training FLOPs per round from nodes.jsonl, accuracy within a budget, the
budgets, and every method's plateau rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resist_fl.run.outputs import CONFIG_FILE, NODES_FILE, append_metrics, write_json
from simulations.equal_cost import CostCurve, budgets, cost_curve, equal_cost_lines, plateau, round_flops

CONFIG = {"batch-size": 32, "local-steps": 10, "local-epochs": 0}


def test_a_rounds_flops_are_the_replied_nodes_cost_per_sample_times_steps_times_batch():
    nodes = [{"round": 1, "status": "accepted", "flops-per-sample": 100, "local-steps": 10},
             {"round": 1, "status": "accepted", "flops-per-sample": 50},  # steps from the run config
             {"round": 1, "status": "no-valid-reply", "flops-per-sample": 1000},  # not counted
             {"round": 2, "status": "accepted", "flops-per-sample": 100, "local-steps": 3}]
    assert round_flops(nodes, CONFIG) == {1: (100 * 10 + 50 * 10) * 32, 2: 100 * 3 * 32}
    assert round_flops([{"round": 1, "status": "accepted", "flops-per-sample": None}], CONFIG) is None
    assert round_flops([{"round": 1, "status": "accepted", "flops-per-sample": 5}],
                       {**CONFIG, "local-epochs": 2}) is None  # steps unknown without the reply's


def test_accuracy_within_a_budget_is_the_last_evaluated_round_within_it():
    curve = CostCurve(np.array([2, 4, 6]), np.array([0.3, 0.5, 0.7]), np.array([10.0, 20.0, 30.0]),
                      np.array([1.0, 2.0, 3.0]))
    assert curve.at("flops", 25.0) == 0.5 and curve.at("flops", 30.0) == 0.7 and math.isnan(curve.at("flops", 9.0))
    assert curve.at("bytes", 1.0) == 0.3
    cheap = CostCurve(np.array([6]), np.array([0.6]), np.array([12.0]), np.array([6.0]))
    dear = CostCurve(np.array([6]), np.array([0.6]), np.array([90.0]), np.array([6.0]))
    assert budgets({"a": [curve], "b": [cheap], "c": [dear]}, "flops") == [7.5, 15.0, 30.0]  # the median's
    assert budgets({"a": [curve], "b": [cheap]}, "flops") == [5.25, 10.5, 21.0]


def test_the_plateau_rule_compares_the_last_fifth_of_the_rounds_with_the_fifth_before():
    rounds = np.arange(1, 11)
    rising = CostCurve(rounds, np.linspace(0.1, 1.0, 10), rounds * 1.0, rounds * 1.0)
    flat = CostCurve(rounds, np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.805, 0.8]), rounds * 1.0,
                     rounds * 1.0)
    gain, plateaued = plateau([rising], 10)
    assert gain == pytest.approx(0.2) and not plateaued  # rounds 9-10 vs 7-8
    gain, plateaued = plateau([flat], 10)
    assert gain == pytest.approx(0.0025) and plateaued


def test_the_report_checks_every_method_and_names_the_ones_still_rising():
    rounds = np.arange(1, 11)
    rising = CostCurve(rounds, np.linspace(0.1, 1.0, 10), rounds * 1.0, rounds * 1.0)
    flat = CostCurve(rounds, np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.805, 0.8]), rounds * 1.0,
                     rounds * 1.0)
    lines, found = equal_cost_lines({"FedAvg": [flat], "HeteroFL": [rising, rising]}, 10)
    text = "\n".join(lines)
    assert "Not plateaued: HeteroFL;" in text
    assert "| FedAvg | +0.0025 | yes |" in text and "| HeteroFL | +0.2000 | **no** |" in text
    assert found["plateaus"]["HeteroFL"] == {"gain": pytest.approx(0.2), "plateaued": False}
    text = "\n".join(equal_cost_lines({"FedAvg": [flat]}, 10)[0])
    assert "Every method has plateaued." in text


def test_a_run_directory_gives_its_cost_curve_and_the_report_section(tmp_path):
    run = tmp_path / "main-fedavg-seed0"
    for r, acc in ((1, 0.2), (2, None), (3, 0.6)):
        append_metrics(run, {"round": r, "accuracy": acc, "cumulative-bytes": 100 * r})
        append_metrics(run, {"round": r, "status": "accepted", "flops-per-sample": 10**9}, name=NODES_FILE)
    write_json(run / CONFIG_FILE, {"run_config": CONFIG})
    curve = cost_curve(run)
    assert curve.round.tolist() == [1, 3] and curve.flops.tolist() == [320e9, 960e9]
    lines, table = equal_cost_lines({"FedAvg": [curve]}, 3)
    text = "\n".join(lines)
    cells = "- | 0.2000 ± 0.0000 | 0.6000 ± 0.0000 (all)"
    assert f"| FedAvg | 0.96 | {cells} | {cells} |" in text
    cheap = CostCurve(np.array([3]), np.array([0.5]), np.array([100e9]), np.array([300.0]))
    text = "\n".join(equal_cost_lines({"FedAvg": [curve], "small": [cheap]}, 3)[0])
    assert "| small | 0.1 | 0.5000 ± 0.0000 (all) |" in text  # spent less than every budget: its final accuracy
    assert "Convergence" not in text and "plateau" not in table  # round 2 was not evaluated: no window before
