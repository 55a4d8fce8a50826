"""HeteroFL's / FedRolex's label split as their codes run it: the logits of labels a node lacks are masked
(set to 0) before the cross-entropy, the node says which labels it holds, and each classifier row is
merged over the nodes holding that label only; refused under DP; bad label lists are rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.model_cost import CostModel
from resist_fl.core.validation import ReplyError, check_labels
from resist_fl.core.width_slicing import key_groups, prefix_indices, slice_state
from resist_fl.flower.round_skeleton import Plan, Update
from resist_fl.flower.width_sliced import HeteroFL
from resist_fl.node.method_hooks import WidthSlice, masked_cross_entropy
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess

SPEC = ModelSpec(depths=(1, 1, 2, 1), base_width=8, num_classes=5)


def test_masked_cross_entropy_ignores_the_labels_a_node_lacks():
    torch.manual_seed(0)
    model = build_model(SPEC).train()
    present = torch.tensor([True, False, True, False, False])
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 2, 2, 0, 0, 2])
    loss = masked_cross_entropy(present)(model, x, y)
    logits = model(x).detach()
    logits[:, ~present] = 0.0  # HeteroFL fills with 0 (not -inf)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    loss.backward()
    rows = model.linear.weight.grad
    assert rows[~present].abs().sum() == 0 and rows[present].abs().sum() > 0  # absent rows get no gradient


def test_the_node_hook_masks_and_reports_its_labels_only_when_the_message_says_so():
    model = build_model(SPEC)
    labels = torch.tensor([3, 1, 3, 3])
    on = WidthSlice().local_training(model, SPEC, {"label-split": True}, 0, labels)
    assert on.reply_metrics == {"labels-held": [1, 3]} and on.loss is not None
    off = WidthSlice().local_training(model, SPEC, {"label-split": False}, 0, labels)
    assert off.reply_metrics == {} and off.loss is None


def test_the_classifier_rows_merge_over_the_nodes_holding_each_label_only():
    layout = BlockLayout.from_spec(SPEC)
    strategy = HeteroFL(SPEC, CostModel(SPEC, layout, 16), layout.payload_keys(),
                        RunSettings(strategy="heterofl", width_rates="1,0.5", base_width=8, capacity_profile="1.0,0.5"))
    rng = np.random.default_rng(0)
    current = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in build_model(SPEC).state_dict().items()
               if k in layout.payload_keys()}
    groups = key_groups(SPEC, list(current))
    updates = []
    for node, (rate, labels, examples) in enumerate(((1.0, (0, 1, 4), 30), (0.5, (1, 2), 10), (0.5, (1, 99), 20))):
        indices = prefix_indices(SPEC, rate)
        arrays = {k: (v + rng.normal(size=v.shape)).astype(np.float32)
                  for k, v in slice_state(current, groups, indices).items()}
        updates.append(Update(node, Plan({}, indices=indices), arrays, examples, labels))
    merged = strategy.merge(current, updates)
    width = {u.node: len(u.plan.indices["trunk4"]) for u in updates}
    expected_w, expected_b = current["linear.weight"].astype(np.float64), current["linear.bias"].astype(np.float64)
    for row in range(5):  # NumPy reference: per label, per column, the weighted mean over its holders
        holders = [u for u in updates if row in u.labels]  # (99 is beyond the 5 classes: ignored)
        if holders:
            total = sum(u.num_examples for u in holders)
            expected_b[row] = sum(u.num_examples * u.arrays["linear.bias"][row] for u in holders) / total
        for col in range(expected_w.shape[1]):
            cover = [u for u in holders if col < width[u.node]]
            if cover:
                expected_w[row, col] = sum(u.num_examples * u.arrays["linear.weight"][row, col] for u in cover) / sum(
                    u.num_examples for u in cover)
    np.testing.assert_allclose(merged["linear.weight"], expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["linear.bias"], expected_b, rtol=1e-5, atol=1e-6)
    assert np.array_equal(merged["linear.bias"][3], current["linear.bias"][3])  # nobody holds label 3
    plain = strategy.merge(current, [Update(u.node, u.plan, u.arrays, u.num_examples) for u in updates])
    assert not np.allclose(plain["linear.bias"], merged["linear.bias"])  # without labels: every row from all


@pytest.mark.parametrize("bad", [[1, 1], [-1], [True], "0,1", [0.5]])
def test_bad_label_lists_are_rejected(bad):
    with pytest.raises(ReplyError, match="labels-held"):
        check_labels(bad)
    assert check_labels([3, 0]) == (0, 3)


def test_label_split_is_refused_under_dp_and_for_methods_that_do_not_read_it(tiny_config):
    with pytest.raises(SettingsError, match="label-split = true: under dp"):
        RunSettings.from_run_config({**tiny_config, "strategy": "heterofl", "dp": "central", "weighting": "uniform"})
    with pytest.raises(SettingsError, match="label-split = False: strategy 'resist' does not use it"):
        RunSettings.from_run_config({**tiny_config, "strategy": "resist", "label-split": False})


@pytest.mark.slow  # a label-skewed federation on real digits, four rounds
def test_heterofl_with_the_label_split_learns_under_label_skew(tiny_config):
    tiny_config.update({"strategy": "heterofl", "dataset": "digits", "partitioner": "dirichlet",
                        "dirichlet-alpha": 0.3, "capacity-profile": "1.0,0.5,0.25", "min-train-nodes": 3,
                        "min-available-nodes": 3, "local-steps": 20, "num-server-rounds": 4,
                        "eval-batch-size": 360, "base-width": 8})
    grid = run_inprocess(tiny_config, num_nodes=3)
    replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    held = [list(r.content["metrics"]["labels-held"]) for r in replies]
    assert all(h == sorted(set(h)) and h for h in held) and any(len(h) < 10 for h in held)
    assert all(m.content["config"]["label-split"] for m in grid.sent if m.metadata.message_type == "train")
    rows = read_metrics(Path(tiny_config["output-dir"]) / tiny_config["run-name"])
    assert rows[-1]["accuracy"] > 0.5 and all(r["replies-accepted"] == 3 for r in rows)
