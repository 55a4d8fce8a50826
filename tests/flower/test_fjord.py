"""FjORD's ordered dropout: the widths drawn are nested and never above the node's own; a batch
at width p trains exactly the nested width-p sub-model (BatchNorm); end to end, a node returns its
largest sub-model and the run learns the real digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.width_slicing import key_groups, prefix_indices, slice_state, sliced_spec
from resist_fl.flower.width_sliced import FJORD_RATES, WIDTH_RATE
from resist_fl.node.ordered_dropout import OrderedDropout
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

SPEC = ModelSpec(depths=(1, 2, 1, 1), base_width=8, num_classes=4)
RATES = (1.0, 0.5, 0.25)


def test_widths_drawn_are_within_the_nodes_own_and_cover_the_set():
    model = build_model(sliced_spec(SPEC, 0.5))
    od = OrderedDropout(model, SPEC, 0.5, RATES, seed=3)
    drawn = {od.sample(step) for step in range(200)}
    assert drawn == {0.5, 0.25}
    with pytest.raises(ValueError, match="includes the node's width 0.5"):
        OrderedDropout(model, SPEC, 0.5, (0.25,), seed=0)


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_a_batch_at_width_p_is_the_nested_sub_model(rate):
    """Training mode, BatchNorm with batch statistics: the masked width-1 model computes exactly
    what the width-p sub-model holding the first p x C channels computes."""
    torch.manual_seed(0)
    full = build_model(SPEC).train()
    od = OrderedDropout(full, SPEC, 1.0, RATES, seed=0)
    od.rate = rate
    state = {k: v.numpy() for k, v in full.state_dict().items()}
    nested = build_model(sliced_spec(SPEC, rate)).train()
    nested.load_state_dict({k: torch.from_numpy(v) for k, v in
                            slice_state(state, key_groups(SPEC, list(state)), prefix_indices(SPEC, rate)).items()})
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(full(x), nested(x), rtol=1e-4, atol=1e-5)


def test_distillation_loss_is_the_teacher_label_loss_plus_the_students_soft_label_loss():
    """FjORD's KD step by hand: CE(largest width, labels) + CE(drawn width, softmax(largest).detach())."""
    torch.manual_seed(1)
    model = build_model(sliced_spec(SPEC, 0.5)).train()
    od = OrderedDropout(model, SPEC, 0.5, RATES, seed=0)
    od.rate = 0.25
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    loss = od.distillation_loss(model, x, y)
    assert od.rate == 0.25  # the drawn width is kept for the step
    torch.manual_seed(1)
    nested = build_model(sliced_spec(SPEC, 0.5)).train()  # the same weights, the nested widths by slicing
    state = {k: v.numpy() for k, v in nested.state_dict().items()}
    quarter = build_model(sliced_spec(SPEC, 0.25)).train()
    quarter.load_state_dict({k: torch.from_numpy(v) for k, v in slice_state(
        state, key_groups(SPEC, list(state)), prefix_indices(SPEC, 0.25)).items()})
    teacher, student = nested(x), quarter(x)
    p = teacher.softmax(1)
    by_hand = -(torch.log_softmax(teacher, 1)[range(5), y]).mean() - (p * torch.log_softmax(student, 1)).sum(1).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-4, atol=1e-5)
    loss.backward()  # the teacher's target is detached: its gradient comes from its label loss only
    assert all(p.grad is not None for p in model.parameters())


def test_each_node_gets_fjords_largest_level_within_its_budget():
    from resist_fl.core.decomposition import BlockLayout
    from resist_fl.core.model_cost import CostModel
    from resist_fl.core.width_slicing import actual_rate
    from resist_fl.flower.width_sliced import FjORD
    from resist_fl.run.settings import RunSettings

    spec = ModelSpec(depths=(1, 1, 3, 1), base_width=10, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    costs = CostModel(spec, layout, 16)
    settings = RunSettings.from_run_config({"strategy": "fjord", "capacity-profile": "1.0", "base-width": 10})
    strategy = FjORD(spec, costs, layout.payload_keys(), settings)
    assert strategy.rates == (1.0, 0.8, 0.6, 0.4, 0.2)  # FjORD's levels (base width 10: all exact)
    for capacity in (1.0, 0.7, 0.5, 0.3, 0.2, 0.1):
        fitting = [r for r in strategy.rates if costs.width_cost(r).flops <= capacity * costs.full.flops * (1 + 1e-9)]
        got = costs.max_rate(capacity, "flops", strategy.rates)
        assert got == (max(fitting) if fitting else min(strategy.rates)), capacity
    assert actual_rate(spec, 0.2) == 0.2


def test_at_base_width_8_a_level_keeps_round_p_x_8_channels_and_the_stage_ratios():
    """The stated deviation from FjORD's code (ceil(p x C) per layer: 2/4/5/7/8 first-stage channels
    at base width 8): here round(p x 8) in the first stage, the later stages in the model's ratios."""
    from resist_fl.core.width_slicing import actual_rate, channel_groups

    spec = ModelSpec(depths=(1, 1, 3, 1), base_width=8, num_classes=10)
    kept = {p: sliced_spec(spec, actual_rate(spec, p)).base_width for p in (0.2, 0.4, 0.6, 0.8, 1.0)}
    assert kept == {0.2: 2, 0.4: 3, 0.6: 5, 0.8: 6, 1.0: 8}
    for p, width in kept.items():
        assert actual_rate(spec, p) == width / 8
        groups, full = channel_groups(sliced_spec(spec, actual_rate(spec, p))), channel_groups(spec)
        assert set(groups) == set(full) and all(groups[g] * 8 == full[g] * width for g in full)


@pytest.mark.slow  # six rounds of 20 steps on three nodes
@pytest.mark.parametrize("strategy", ["fjord", "fjord-kd"])
def test_fjord_end_to_end_on_real_digits(tiny_config, strategy):
    tiny_config.update({"strategy": strategy, "capacity-profile": "1.0,0.5,0.25", "min-train-nodes": 3,
                        "min-available-nodes": 3, "dataset": "digits", "local-steps": 20, "base-width": 10,
                        "batch-size": 32, "num-server-rounds": 6, "eval-batch-size": 360, "run-name": strategy})
    grid = run_inprocess(tiny_config, num_nodes=3)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    own = set()
    for message in sent:  # each node gets its largest level and the levels at or below it
        rate = message.content["config"][WIDTH_RATE]
        own.add(rate)
        assert list(message.content["config"][FJORD_RATES]) == [r for r in (0.2, 0.4, 0.6, 0.8, 1.0) if r <= rate]
        assert message.content["config"]["fjord-distill"] == (strategy == "fjord-kd")
    assert len(own) == 3 and max(own) == 1.0
    rows = read_metrics(Path(tiny_config["output-dir"]) / tiny_config["run-name"])
    smallest = f"accuracy-width-{round(100 * min(own), 2):g}"
    print(f"\ndigits {strategy}: accuracy {[round(r['accuracy'], 3) for r in rows]}, {smallest} "
          f"{rows[-1][smallest]:.3f}")
    assert rows[-1]["accuracy"] >= 0.8 and rows[-1][smallest] >= 0.5  # nested widths all learn
    assert all(r["strategy"] == strategy and r["replies-accepted"] == 3 for r in rows)
    assert np.isfinite([r["train-loss"] for r in rows]).all()
