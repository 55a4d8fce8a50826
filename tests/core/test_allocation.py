"""Capacity-aware decomposition: properties over many seeds and capacity mixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resist_fl.core.allocation import allocate_depths, check_capacity, deal_blocks
from resist_fl.core.model_cost import max_depth
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.residual_nets import set_residual_scales

capacities = st.lists(st.sampled_from([1.0, 0.75, 0.5, 0.3, 0.25, 0.1, 0.05]), min_size=1, max_size=9)


def _blocks(count: int) -> list[str]:
    return [f"layer3.{i}" for i in range(1, count + 1)]


def _deal(count: int, caps: list[float], weights, min_blocks: int, seed: int, rnd: int):
    blocks = _blocks(count)
    maxima = [max_depth(c, count) for c in caps]
    depths = allocate_depths(count, maxima, weights, min_blocks)
    return blocks, maxima, deal_blocks(blocks, depths, round_rng(seed, rnd))


def _old_sampler(blocks, num_subnetworks, min_blocks, rng):
    """The sampler before capacities existed, kept verbatim to pin today's distribution."""
    num_blocks = len(blocks)
    base, rest = divmod(num_blocks, num_subnetworks)
    sizes = [max(base + (i < rest), min_blocks, 1) for i in range(num_subnetworks)]
    order = rng.permutation(num_blocks)
    starts = np.cumsum([0, *sizes[:-1]])
    return [tuple(blocks[i] for i in sorted(order[(start + np.arange(size)) % num_blocks]))
            for start, size in zip(starts, sizes)]


@settings(max_examples=300, deadline=None)
@given(count=st.integers(1, 30), caps=capacities, policy=st.sampled_from(["uniform", "capacity", "random"]),
       min_blocks=st.integers(0, 6), seed=st.integers(0, 10_000), rnd=st.integers(1, 50),
       data=st.data())
def test_maxima_coverage_min_depth_and_no_duplicates(count, caps, policy, min_blocks, seed, rnd, data):
    min_blocks = min(min_blocks, count)
    weights = {"uniform": None, "capacity": caps,
               "random": data.draw(st.lists(st.floats(0.01, 100), min_size=len(caps), max_size=len(caps)))}[policy]
    blocks, maxima, result = _deal(count, caps, weights, min_blocks, seed, rnd)
    assert len(result.groups) == len(caps)
    for group, maximum in zip(result.groups, maxima):
        assert 1 <= len(group) <= maximum  # (a) never above a node's maximum
        assert len(set(group)) == len(group)  # no block twice in a sub-network
        assert list(group) == sorted(group, key=blocks.index)  # forward order
        assert len(group) >= min(min_blocks, maximum)  # (d) minimum depth where it fits
    held = set().union(*result.groups)
    if sum(maxima) >= count:
        assert held == set(blocks) and result.untrained == ()  # (b) coverage whenever possible
    else:  # (c) as many as the maxima allow, and the rest named
        assert len(held) == sum(maxima) and set(result.untrained) == set(blocks) - held
    again = _deal(count, caps, weights, min_blocks, seed, rnd)[2]
    assert again.groups == result.groups  # determinism for (seed, round)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 30), nodes=st.integers(1, 12), min_blocks=st.integers(0, 8),
       seed=st.integers(0, 10_000), rnd=st.integers(1, 50))
def test_equal_capacities_reproduce_todays_sampler(count, nodes, min_blocks, seed, rnd):
    min_blocks = min(min_blocks, count)
    blocks = _blocks(count)
    today = _old_sampler(blocks, nodes, min_blocks, round_rng(seed, rnd))
    assert sample_subnetworks(blocks, nodes, min_blocks, round_rng(seed, rnd)) == today
    for policy in (None, [1.0] * nodes):  # uniform, and capacity allocation with equal capacities
        maxima = [max_depth(1.0, count)] * nodes
        ours = deal_blocks(blocks, allocate_depths(count, maxima, policy, min_blocks), round_rng(seed, rnd))
        assert ours.groups == today


def test_capacity_allocation_is_proportional_and_spills_over_a_full_node():
    assert allocate_depths(8, [8, 4, 2, 2], [1.0, 0.5, 0.25, 0.25]) == [4, 2, 1, 1]
    assert allocate_depths(22, [22, 22], [3.0, 1.0]) == [17, 5]  # 16.5 / 5.5: the tie goes to the first
    # the first node's share (12) exceeds its maximum (5): it gets 5, the rest is shared 1:1
    assert allocate_depths(16, [5, 16, 16], [2.0, 1.0, 1.0]) == [5, 6, 5]
    assert allocate_depths(10, [2, 3], None) == [2, 3]  # the maxima do not cover: everyone at the maximum
    assert allocate_depths(10, [2, 9], None, min_blocks=4) == [2, 8]  # the minimum only where it fits


def test_max_depth_and_capacity_checks():
    assert max_depth(1.0, 22) == 22 and max_depth(0.25, 22) == 5 and max_depth(0.01, 22) == 1
    assert max_depth(0.5, 8) == 4  # exact products are not rounded down by float error
    for bad in (0, 1.5, -0.2, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="expected a number in \\(0, 1\\]"):
            check_capacity(bad)


def test_uncovered_blocks_are_named():
    _, _, result = _deal(10, [0.1, 0.2], None, 0, seed=3, rnd=1)
    assert sorted(len(g) for g in result.groups) == [1, 2] and len(result.untrained) == 7


def test_full_model_output_stays_on_the_scale_of_the_subnetworks():
    """With the mean held fraction as inference scale, the full model's residual sum over the
    partitioned stage is on the scale of the heterogeneous sub-networks' (mean over them)."""
    torch.manual_seed(0)
    spec = ModelSpec(depths=(1, 1, 13, 1), base_width=8, num_classes=10)
    layout = BlockLayout.from_spec(spec)
    full = build_model(spec).eval()
    state = full.state_dict()
    count = len(layout.partitionable)
    _, _, result = _deal(count, [1.0, 0.5, 0.25, 0.25], [1.0, 0.5, 0.25, 0.25], 0, seed=1, rnd=1)
    assert len({len(g) for g in result.groups}) > 1  # the depths really differ
    x = torch.randn(64, 8 * 2, 16, 16)  # the input of stage 3 (after stage 2: width 16, 16x16)

    def stage3_growth(model) -> float:
        with torch.no_grad():
            return float((model.layer3(x).norm() / model.layer3[0](x).norm()).item())

    growth = []
    for group in result.groups:
        sub = layout.build_subnetwork(spec, group).eval()
        sub.load_state_dict({k: v for k, v in state.items() if k in sub.state_dict()})
        growth.append(stage3_growth(sub))
    set_residual_scales(full, layout.inference_scales(len(result.groups), held_fraction=result.held_fraction))
    scaled = stage3_growth(full)
    set_residual_scales(full, {b: 1.0 for b in layout.partitionable})
    unscaled = stage3_growth(full)
    mean = float(np.mean(growth))
    assert abs(scaled - mean) < abs(unscaled - mean)
    assert min(growth) * 0.8 <= scaled <= max(growth) * 1.25
