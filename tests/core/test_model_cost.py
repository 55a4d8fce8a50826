"""One budget for every method: FLOPs counted by FlopCounterMode agree with a hand count; the
largest sub-model each method gives a node fits the node's capacity (or is the smallest there is,
flagged); ResIST's shared layers are a floor."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import WIDTH_RATES, CostModel, measure

SPEC = ModelSpec(depths=(1, 1, 6, 1), base_width=8, in_channels=1, num_classes=10)
COSTS = CostModel(SPEC, BlockLayout.from_spec(SPEC), 16)


def test_flops_agree_with_a_hand_count():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    cost = measure(model, 8, 1)
    conv = 2 * 4 * 1 * 9 * 8 * 8          # multiply-adds of the convolution, per sample
    linear = 2 * (4 * 8 * 8) * 10
    # backward: the convolution's weight gradient (its input needs none), the linear layer's
    # input and weight gradients
    assert cost.flops == conv + conv + linear * 3
    assert cost.params == 4 * 9 + 4 * 64 * 10 + 10


def test_the_blocks_of_a_stage_cost_the_same_and_add_up():
    blocks = COSTS.layout.partitionable
    assert len(blocks) == 5 and len({COSTS.block[b] for b in blocks}) == 1
    assert COSTS.depth_cost(blocks) == COSTS.full
    assert 0 < COSTS.floor_fraction() < 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(capacity=st.floats(0.01, 1.0), measure_name=st.sampled_from(["flops", "params"]))
def test_each_method_fits_the_budget_or_gives_its_smallest(capacity, measure_name):
    budget = capacity * COSTS.full.of(measure_name)
    depth = COSTS.max_depth(capacity, measure_name)
    cost = COSTS.depth_cost(COSTS.layout.partitionable[:depth]).of(measure_name)
    assert cost <= budget * (1 + 1e-9) or depth == 1  # one block: ResIST's floor
    if depth < len(COSTS.layout.partitionable):  # the next depth would not fit
        assert COSTS.depth_cost(COSTS.layout.partitionable[:depth + 1]).of(measure_name) > budget
    rate = COSTS.max_rate(capacity, measure_name)
    assert COSTS.width_cost(rate).of(measure_name) <= budget * (1 + 1e-9) or rate == min(WIDTH_RATES)
    larger = [r for r in WIDTH_RATES if r > rate]
    assert all(COSTS.width_cost(r).of(measure_name) > budget for r in larger)


def test_blocks_measure_is_resists_original_meaning():
    assert [COSTS.max_depth(c, "blocks") for c in (1.0, 0.5, 0.2)] == [5, 2, 1]
    assert COSTS.max_rate(0.3, "blocks") == 0.25
