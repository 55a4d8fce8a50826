"""Remedies measured for label skew (docs/results/noniid): a server step and gradient clipping.

Both are run-config keys (``server-lr``, ``clip-grad-norm``) for ResIST and FedAvg alike, so a
comparison can switch them on for both strategies and still differ in the strategy alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from resist_fl.core.aggregation import merge_partial, server_step
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings
from resist_fl.node.training import train
from client_app.app import _run as client_run
from resist_fl.core.model_cost import CostModel
from resist_fl.flower.method_factory import ModelParts, build
from server_app.app import model_config
from simulations.inprocess import run_inprocess


def test_server_step_moves_floats_part_of_the_way_and_takes_integer_buffers():
    current = {"w": np.array([0.0, 2.0], np.float32), "n": np.array(4, np.int64), "kept": np.ones(2, np.float32)}
    merged = merge_partial(current, [{"w": np.array([4.0, 6.0], np.float32), "n": np.array(10, np.int64)}], [1.0])
    stepped = server_step(current, merged, 0.25)
    np.testing.assert_array_equal(stepped["w"], np.array([1.0, 3.0], np.float32))
    assert stepped["w"].dtype == np.float32
    assert stepped["n"] == 10 and stepped["n"].dtype == np.int64
    assert stepped["kept"] is current["kept"]  # no holder: the very same array
    assert server_step(current, merged, 1.0) == merged  # 1.0: the plain merge
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="server_lr"):
            server_step(current, merged, bad)


def test_clipping_bounds_every_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.randn(8, 1, 3, 4) * 100, torch.randint(0, 3, (8,))  # huge gradients
    loader = [(images, labels)]
    train(model, loader, steps=1, lr=0.1, momentum=0.0, weight_decay=0.0, device=torch.device("cpu"),
          clip_grad_norm=0.01)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < moved <= 0.1 * 0.01 * (1 + 1e-5)


def test_the_keys_are_validated_and_reach_both_strategies_and_the_clients():
    # the errors of both keys: tests/run/test_settings.py
    spec = ModelSpec(depths=(1, 1, 3, 1), base_width=4)
    layout = BlockLayout.from_spec(spec)
    model = ModelParts(spec, layout, CostModel(spec, layout, (32, 32)))
    for strategy in ("resist", "fedavg"):
        settings = RunSettings.from_run_config({"strategy": strategy, "server-lr": 0.5, "clip-grad-norm": 2.0})
        assert build(settings, model).strategy.settings.server_lr == 0.5
        # the clients read it from the run config they receive (one path; not repeated in messages)
        assert client_run(tuple(sorted(settings.to_run_config().items())), 10, 3)[0].clip_grad_norm == 2.0
        assert "clip-grad-norm" not in model_config(ModelSpec())


@pytest.mark.parametrize("strategy", ["resist", "fedavg"])
def test_a_run_with_both_remedies(tiny_config, strategy):
    config = {**tiny_config, "strategy": strategy, "server-lr": 0.5, "clip-grad-norm": 1.0, "run-name": strategy}
    run_inprocess(config, num_nodes=2)
    rows = read_metrics(Path(tiny_config["output-dir"]) / strategy)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replies-accepted"] == 2 and np.isfinite(r["train-loss"]) for r in rows)
