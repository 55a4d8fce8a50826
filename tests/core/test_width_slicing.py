"""Width-sliced sub-models (HeteroFL / FedRolex / FjORD): global names with sliced shapes, the
sliced model computes what the full model computes with the dropped channels zeroed, windows roll
and wrap, prefixes nest, and the merge is the element-wise mean over holders (NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.width_slicing import (
    actual_rate,
    channel_groups,
    element_index,
    key_groups,
    merge_sliced,
    prefix_indices,
    rolling_indices,
    slice_state,
    sliced_spec,
)

SPEC = ModelSpec(depths=(1, 2, 2, 1), base_width=8, num_classes=5, norm="batchnorm-running")


def state_of(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy().copy() for k, v in build_model(spec).state_dict().items()}


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.25, 0.125])
def test_a_sub_model_has_the_global_names_with_sliced_shapes(rate):
    full = state_of(SPEC)
    small = build_model(sliced_spec(SPEC, rate)).state_dict()
    groups = key_groups(SPEC, list(full))
    cut = slice_state(full, groups, prefix_indices(SPEC, rate))
    assert list(cut) == list(full) == list(small)
    for key, value in cut.items():
        assert value.shape == tuple(small[key].shape), key
    assert cut["linear.weight"].shape == (5, int(64 * rate))  # every class kept
    assert actual_rate(SPEC, rate) == rate


def test_the_sliced_model_equals_the_full_model_with_dropped_channels_zeroed():
    """No scaler, eval mode, BN with running statistics: the identity holds exactly."""
    full = state_of(SPEC, seed=1)
    for key, value in full.items():  # non-trivial running statistics
        if "running_var" in key:
            value[:] = np.linspace(0.5, 2.0, value.size)
        elif "running_mean" in key:
            value[:] = np.linspace(-0.3, 0.3, value.size)
    groups = key_groups(SPEC, list(full))
    for rate, indices in ((0.5, prefix_indices(SPEC, 0.5)), (0.25, rolling_indices(SPEC, 0.25, 7))):
        small_model = build_model(sliced_spec(SPEC, rate)).eval()
        small_model.load_state_dict({k: torch.from_numpy(v) for k, v in slice_state(full, groups, indices).items()})
        zeroed = {k: v.copy() for k, v in full.items()}
        for key, value in zeroed.items():
            if not groups[key] or value.dtype.kind != "f":
                continue
            keep = np.zeros(value.shape, bool)
            keep[element_index(value.shape, groups[key], indices)] = True
            # dropped output channels: weights, biases and BN affine zeroed (inputs of dropped channels are 0)
            value[~keep] = 0.0 if "running_var" not in key else 1.0
        full_model = build_model(SPEC).eval()
        full_model.load_state_dict({k: torch.from_numpy(v) for k, v in zeroed.items()})
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(small_model(x), full_model(x), rtol=1e-5, atol=1e-5)


def test_fedrolex_windows_advance_by_one_and_wrap():
    sizes = channel_groups(SPEC)
    for server_round in range(0, 70):
        windows = rolling_indices(SPEC, 0.25, server_round)
        for group, idx in windows.items():
            expected = np.sort((server_round + np.arange(sizes[group] // 4)) % sizes[group])
            np.testing.assert_array_equal(idx, expected)
    trunk = [set(rolling_indices(SPEC, 0.25, r)["trunk1"].tolist()) for r in range(sizes["trunk1"])]
    assert set().union(*trunk) == set(range(sizes["trunk1"]))  # every channel trained over time


def test_prefixes_are_nested():
    small, large = prefix_indices(SPEC, 0.25), prefix_indices(SPEC, 0.5)
    for group in small:
        assert set(small[group].tolist()) <= set(large[group].tolist())


def reference_merge(global_state, updates, groups, weights):
    """The element-wise mean over holders, one element at a time (slow, obviously right)."""
    out = {}
    for key, current in global_state.items():
        total = np.zeros(current.shape)
        count = np.zeros(current.shape)
        for (update, indices), w in zip(updates, weights):
            if key not in update:
                continue
            coords = [range(n) for n in current.shape]
            for d, g in enumerate(groups[key]):
                if g is not None:
                    coords[d] = indices[g]
            for local, position in enumerate(np.ndindex(*[len(c) for c in coords])):
                target = tuple(coords[d][p] for d, p in enumerate(position))
                total[target] += w * update[key].reshape(-1)[local] if update[key].ndim else w * update[key]
                count[target] += w
        mean = np.where(count > 0, total / np.where(count > 0, count, 1), current)
        out[key] = np.rint(mean).astype(current.dtype) if current.dtype.kind in "iu" else mean.astype(current.dtype)
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rates=st.lists(st.sampled_from([0.25, 0.5, 1.0]), min_size=1, max_size=3),
       rounds=st.lists(st.integers(0, 40), min_size=3, max_size=3),
       rolling=st.booleans(), weights=st.lists(st.floats(0.5, 5.0), min_size=3, max_size=3))
def test_the_merge_is_the_elementwise_mean_over_holders(rates, rounds, rolling, weights):
    spec = ModelSpec(depths=(1, 1, 1, 1), base_width=4, num_classes=3, norm="batchnorm-running")
    global_state = state_of(spec)
    groups = key_groups(spec, list(global_state))
    rng = np.random.default_rng(len(rates))
    updates = []
    for rate, server_round in zip(rates, rounds):
        indices = rolling_indices(spec, rate, server_round) if rolling else prefix_indices(spec, rate)
        cut = slice_state(global_state, groups, indices)
        updates.append(({k: (v + rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 3
                         for k, v in cut.items()}, indices))
    merged = merge_sliced(global_state, updates, groups, weights[:len(updates)])
    expected = reference_merge(global_state, updates, groups, weights[:len(updates)])
    for key in global_state:
        assert merged[key].dtype == global_state[key].dtype, key
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_untouched_elements_stay_and_bad_input_is_refused():
    global_state = state_of(SPEC)
    groups = key_groups(SPEC, list(global_state))
    indices = prefix_indices(SPEC, 0.5)
    update = {k: np.zeros_like(v) for k, v in slice_state(global_state, groups, indices).items()}
    merged = merge_sliced(global_state, [(update, indices)], groups, [1.0])
    w = merged["linear.weight"]
    assert (w[:, :32] == 0).all() and np.array_equal(w[:, 32:], global_state["linear.weight"][:, 32:])
    with pytest.raises(ValueError, match="got 1 updates but 2 weights"):
        merge_sliced(global_state, [(update, indices)], groups, [1.0, 1.0])
    with pytest.raises(ValueError, match="width rate = 0"):
        sliced_spec(SPEC, 0)
    with pytest.raises(ValueError, match="pre-activation family"):
        sliced_spec(ModelSpec(depths=(2, 2, 2, 2), arch="torchvision_resnet18"), 0.5)


def test_the_head_norm_is_sliced_with_the_last_stages_trunk():
    from resist_fl.core.model import ModelSpec, build_model
    from resist_fl.core.width_slicing import key_groups, prefix_indices, slice_state, sliced_spec

    spec = ModelSpec(depths=(1, 1, 2, 1), base_width=8, num_classes=10, head_norm=True)
    state = {k: v.numpy() for k, v in build_model(spec).state_dict().items()}
    groups = key_groups(spec, list(state))
    assert groups["head_norm.weight"] == groups["head_norm.bias"] == ("trunk4",)
    cut = slice_state(state, groups, prefix_indices(spec, 0.5))
    small = build_model(sliced_spec(spec, 0.5)).state_dict()
    assert {k: v.shape for k, v in cut.items()} == {k: tuple(v.shape) for k, v in small.items()}
