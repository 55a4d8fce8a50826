"""Block layout, sub-network sampling and inference scales."""

import itertools

import numpy as np
import pytest

from resist_fl.core.decomposition import (
    SHARED,
    BlockLayout,
    inference_scale,
    is_scale_key,
    round_rng,
    sample_subnetworks,
)
from resist_fl.core.model import ModelSpec

R101 = ModelSpec.from_name("preact_resnet101")
BLOCKS22 = BlockLayout.from_spec(R101).partitionable


def test_default_layout_partitions_stage3_after_its_first_block():
    layout = BlockLayout.from_spec(R101)
    assert layout.partitionable == tuple(f"layer3.{i}" for i in range(1, 23))
    assert layout.key_block["layer3.0.conv1.weight"] == SHARED
    assert layout.key_block["layer3.5.bn2.bias"] == "layer3.5"
    assert layout.key_block["conv1.weight"] == SHARED and layout.key_block["linear.bias"] == SHARED
    assert set(layout.keys) == set(layout.shared_keys) | {
        k for b in layout.partitionable for k in layout.block_keys(b)}


def test_layout_stages_are_configurable():
    layout = BlockLayout.from_spec(R101, partitioned_stages=(2, 3, 4))
    assert len(layout.partitionable) == 3 + 22 + 2
    with pytest.raises(ValueError, match="subset of 1-4"):
        BlockLayout.from_spec(R101, partitioned_stages=(5,))
    with pytest.raises(ValueError, match="nothing to partition"):
        BlockLayout.from_spec(ModelSpec(depths=(1, 1, 1, 1)))


def test_payload_excludes_scales_and_unheld_blocks():
    layout = BlockLayout.from_spec(R101)
    keys = layout.payload_keys(["layer3.4"])
    assert not any(is_scale_key(k) for k in keys)
    assert {layout.key_block[k] for k in keys} == {SHARED, "layer3.4"}
    with pytest.raises(ValueError, match="layer3.0"):
        layout.payload_keys(["layer3.0"])


SETTINGS = [(s, m) for s in (1, 2, 3, 4, 5, 8, 21, 22, 23, 40) for m in (0, 1, 3, 8, 11, 22)]


@pytest.mark.parametrize("num_sub, min_blocks", SETTINGS)
def test_sampler_invariants_over_many_seeds(num_sub, min_blocks):
    target = max(1, min_blocks)
    for seed in range(25):
        groups = sample_subnetworks(BLOCKS22, num_sub, min_blocks, round_rng(seed, 3))
        assert len(groups) == num_sub
        held = [b for g in groups for b in g]
        assert set(held) == set(BLOCKS22), "every block held at least once"
        assert all(len(set(g)) == len(g) for g in groups), "no block twice in a group"
        sizes = [len(g) for g in groups]
        assert min(sizes) >= target
        if num_sub <= 22 and target <= 22 // num_sub:
            assert max(sizes) - min(sizes) <= 1, "balanced without min depth"
        counts = np.unique(held, return_counts=True)[1]
        if max(22, num_sub * target) == 22:
            assert len(held) == 22, "no duplicates when none are needed"
        assert counts.max() - counts.min() <= 1, "duplicates spread evenly"


def test_sampler_is_deterministic_per_seed_and_round_and_varies_otherwise():
    def draw(seed, rnd):
        return sample_subnetworks(BLOCKS22, 4, 0, round_rng(seed, rnd))

    assert draw(7, 2) == draw(7, 2)
    assert len({tuple(draw(7, r)) for r in range(10)}) > 1
    assert draw(7, 2) != draw(8, 2)


def test_sampler_draws_every_block_with_equal_frequency():
    hits = dict.fromkeys(BLOCKS22, 0)
    for rnd in range(2000):
        for b in sample_subnetworks(BLOCKS22, 4, 0, round_rng(0, rnd))[0]:
            hits[b] += 1
    freq = np.array(list(hits.values())) / 2000
    assert np.allclose(freq, 6 / 22, atol=0.04)  # the first of 4 groups holds 6 of 22 blocks


@pytest.mark.parametrize("num_sub, min_blocks, match", [(0, 0, "sub-networks"), (2, 23, "min blocks"),
                                                        (2, -1, "min blocks")])
def test_sampler_rejects_impossible_settings(num_sub, min_blocks, match):
    with pytest.raises(ValueError, match=match):
        sample_subnetworks(BLOCKS22, num_sub, min_blocks, round_rng(0, 1))


@pytest.mark.parametrize("s, m, p, expected", [(4, 0, 22, 0.25), (8, 0, 22, 0.125), (8, 8, 22, 8 / 22),
                                               (2, 3, 22, 0.5), (1, 0, 22, 1.0), (40, 0, 22, 1 / 22)])
def test_inference_scale(s, m, p, expected):
    assert inference_scale(s, m, p) == pytest.approx(expected)


def test_inference_scale_matches_held_fraction_of_sampled_groups():
    for s, m in itertools.product((2, 4, 8), (0, 8)):
        groups = sample_subnetworks(BLOCKS22, s, m, round_rng(0, 0))
        mean_fraction = np.mean([len(g) for g in groups]) / 22
        assert inference_scale(s, m, 22) == pytest.approx(mean_fraction, abs=0.5 / 22 + 1e-9)
