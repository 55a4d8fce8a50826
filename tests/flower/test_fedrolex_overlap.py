"""FedRolex's overlap option as its code computes it: a random channel order per round and, node after
node, windows shifted by floor(L x (1 - overlap)) + 1 modulo the window size L; unset, the one rolling window."""

from __future__ import annotations

import numpy as np
import pytest

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import CostModel
from resist_fl.core.width_slicing import channel_groups, overlapping_windows, rolling_indices, sliced_spec
from resist_fl.flower.width_sliced import FedRolex
from resist_fl.run.settings import RunSettings, SettingsError

SPEC = ModelSpec(depths=(1, 1, 2, 1), base_width=16, num_classes=10)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.9, 1.0])
def test_the_windows_follow_the_codes_stride(overlap):
    rates = [0.5, 0.5, 0.25, 0.5]
    windows = overlapping_windows(SPEC, rates, overlap, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # the reference: the same permutations, the stride by hand
    full = channel_groups(SPEC)
    permutation = {g: rng.permutation(n) for g, n in full.items()}
    for group in full:
        offset = 0
        for node, rate in enumerate(rates):
            size = channel_groups(sliced_spec(SPEC, rate))[group]
            offset = (offset + int(size * (1 - overlap)) + 1) % size
            expected = np.sort([permutation[group][(j - offset) % full[group]] for j in range(size)])
            np.testing.assert_array_equal(windows[node][group], expected)
            assert len(set(windows[node][group])) == size


def test_the_strategy_uses_the_option_and_keeps_the_rolling_window_without_it():
    layout = BlockLayout.from_spec(SPEC)
    costs = CostModel(SPEC, layout, 16)
    plain = FedRolex(SPEC, costs, layout.payload_keys(), RunSettings(strategy="fedrolex", base_width=16))
    assert plain.node_windows([0.5, 0.5], 3) is None
    assert {g: list(v) for g, v in plain.indices_for(0.5, 3).items()} == \
        {g: list(v) for g, v in rolling_indices(SPEC, 0.5, 3).items()}
    shifted = FedRolex(SPEC, costs, layout.payload_keys(),
                       RunSettings(strategy="fedrolex", base_width=16, fedrolex_overlap="0.5"))
    first, second = shifted.node_windows([0.5, 0.5], 3)
    assert any(not np.array_equal(first[g], second[g]) for g in first)  # two nodes of one rate differ
    again = shifted.node_windows([0.5, 0.5], 3)
    assert all(np.array_equal(first[g], again[0][g]) for g in first)  # reproducible from seed and round
    with pytest.raises(SettingsError, match="fedrolex-overlap = '2': expected '' or a number in"):
        RunSettings.from_run_config({"strategy": "fedrolex", "fedrolex-overlap": "2"})
    with pytest.raises(SettingsError, match="does not use it"):
        RunSettings.from_run_config({"strategy": "heterofl", "fedrolex-overlap": "0.5"})


def test_fedrolex_with_overlap_under_dynamic_capacities_runs_end_to_end(tiny_config):
    """The option and HeteroFL's / FedRolex's dynamic setting together, through the real apps: every
    node-round within its (redrawn) budget, the rates the budgets allow, the model still finite."""
    from pathlib import Path

    from resist_fl.run.outputs import read_metrics
    from simulations.inprocess import run_inprocess

    tiny_config.update({"strategy": "fedrolex", "fedrolex-overlap": "0.5", "capacity-mode": "dynamic",
                        "capacity-profile": "1.0,0.5,0.25", "model": "preact_resnet18", "num-server-rounds": 2,
                        "local-steps": 1, "eval-every": 2, "min-train-nodes": 3, "min-available-nodes": 3})
    run_inprocess(tiny_config, num_nodes=3)
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    nodes, rows = read_metrics(run_dir, "nodes.jsonl"), read_metrics(run_dir)
    assert len(nodes) == 6 and {n["capacity"] for n in nodes} <= {1.0, 0.5, 0.25}
    assert len({n["capacity"] for n in nodes}) > 1  # redrawn
    assert all(n["over-capacity"] == 0 and n["budget-used"] <= 1 + 1e-9 for n in nodes)
    assert all(n["width-rate"] == 1.0 for n in nodes if n["capacity"] == 1.0)
    assert all(n["width-rate"] < 1.0 for n in nodes if n["capacity"] < 1.0)
    assert rows[-1]["replies-accepted"] == 3 and 0 <= rows[-1]["accuracy"] <= 1
