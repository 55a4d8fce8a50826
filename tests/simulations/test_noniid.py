"""Non-IID data: with the app's defaults, ResIST under label skew stays close to FedAvg.

Real images (scikit-learn's digits as a user's ``.npz``), flwr-datasets' Dirichlet partitioner
with alpha 0.3 (partitions that miss whole classes), 4 nodes, a small PreActResNet with the
default normalisation (the paper's BatchNorm), the real ServerApp and ClientApp, two seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

SEEDS = (0, 1)

pytestmark = pytest.mark.slow  # full federations on real digits (about 2 min)


def final_accuracy(config: dict, digits_npz: str, strategy: str, seed: int) -> tuple[float, list[dict]]:
    name = f"{strategy}-seed{seed}"
    config.update({"dataset": "npz", "data-path": digits_npz, "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
                   "stage-depths": "1,1,4,1", "base-width": 8, "local-steps": 20, "batch-size": 32,
                   "num-server-rounds": 10, "eval-batch-size": 360, "min-available-nodes": 4,
                   "min-train-nodes": 4, "strategy": strategy, "seed": seed, "run-name": name})
    run_inprocess(config, num_nodes=4)
    rows = read_metrics(Path(config["output-dir"]) / name)
    print(f"\ndirichlet 0.3 {strategy} seed {seed}: accuracy {[round(r['accuracy'], 3) for r in rows]}")
    return rows[-1]["accuracy"], rows


@pytest.mark.parametrize("seed", SEEDS)
def test_resist_under_label_skew_stays_close_to_fedavg(tiny_config, digits_npz, seed):
    resist, rows = final_accuracy(dict(tiny_config), digits_npz, "resist", seed)
    fedavg, _ = final_accuracy(dict(tiny_config), digits_npz, "fedavg", seed)
    assert resist >= 0.9  # chance is 0.1
    assert resist >= fedavg - 0.03, (resist, fedavg)
    assert not any(r["diverging"] for r in rows)


def test_fifty_local_steps_under_skew_do_not_diverge_with_the_defaults(tiny_config, digits_npz):
    """The harder setting of docs/results/noniid: PreActResNet-101 width 16, 50 local steps, Dirichlet 0.3,
    seed 1. Without gradient clipping (the earlier default) ResIST + BatchNorm blew up there in round 5 with
    the code of commit 9508bb9 (its trace is committed there). Its first 6 rounds are run here with a constant
    lr, which is what the 15-round step schedule uses in those rounds. (FedAvg, which never diverged there, is
    compared with ResIST under the same skew by the test above.)"""
    name = "hard-resist"
    config = {**tiny_config, "dataset": "npz", "data-path": digits_npz, "partitioner": "dirichlet",
              "dirichlet-alpha": 0.3, "model": "preact_resnet101", "stage-depths": "", "base-width": 16,
              "local-steps": 50, "batch-size": 32, "lr": 0.05, "lr-schedule": "constant",
              "num-server-rounds": 6, "eval-batch-size": 360, "min-available-nodes": 4, "min-train-nodes": 4,
              "strategy": "resist", "seed": 1, "run-name": name}
    run_inprocess(config, num_nodes=4)
    rows = read_metrics(Path(config["output-dir"]) / name)
    print(f"\n50 steps, dirichlet 0.3, resist seed 1: accuracy {[round(r['accuracy'], 3) for r in rows]}, "
          f"train loss {[round(r['train-loss'], 3) for r in rows]}")
    assert [r["round"] for r in rows if r["diverging"]] == []
    assert max(r["train-loss"] for r in rows[1:]) < 2 * rows[0]["train-loss"]  # no blow-up
    assert rows[-1]["accuracy"] >= 0.9
