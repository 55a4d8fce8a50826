"""Merge of partial updates: hand-computed, property-based and a full round trip."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resist_fl.core.aggregation import merge_partial, update_weights
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.model import ModelSpec, build_model


def test_hand_computed_merge():
    glob = {"a": np.zeros(2, np.float32), "b": np.array([5, 5]), "c": np.array([1.5, 2.5])}
    updates = [{"a": np.array([1, 2], np.float32), "b": np.array([1, 2])},
               {"a": np.array([3, 6], np.float32)}]
    merged = merge_partial(glob, updates, [1.0, 3.0])
    np.testing.assert_array_equal(merged["a"], np.array([2.5, 5.0], np.float32))
    np.testing.assert_array_equal(merged["b"], np.array([1, 2]))  # one holder: copied
    assert merged["b"].dtype == np.int64 and merged["a"].dtype == np.float32
    assert merged["c"] is glob["c"]  # untouched keys are the same array
    assert list(merged) == list(glob)


def test_integer_buffers_are_rounded_and_stay_integer():
    glob = {"n": np.array(0, np.int64)}
    merged = merge_partial(glob, [{"n": np.array(10)}, {"n": np.array(13)}], [1, 1])
    assert merged["n"].dtype == np.int64 and merged["n"] == 12  # 11.5 rounds to even


def test_weightings():
    assert update_weights([10, 30], "examples") == [10.0, 30.0]
    assert update_weights([10, 30], "uniform") == [1.0, 1.0]
    with pytest.raises(ValueError, match="median"):
        update_weights([1], "median")


@pytest.mark.parametrize("updates, weights, match", [
    ([{"x": np.zeros(3)}], [1.0], "shape"),
    ([{"y": np.zeros(2)}], [1.0], "not in the global state"),
    ([{"x": np.zeros(2)}], [0.0], "positive"),
    ([{"x": np.zeros(2)}], [1.0, 2.0], "weights"),
])
def test_bad_updates_are_rejected(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        merge_partial({"x": np.ones(2)}, updates, weights)


DTYPES = [np.float32, np.float64, np.float16, np.int64]


@st.composite
def merge_case(draw):
    n_keys = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    glob = {}
    for i in range(n_keys):
        dtype = DTYPES[draw(st.integers(0, len(DTYPES) - 1))]
        shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
        glob[f"k{i}"] = (rng.standard_normal(shape) * 100).astype(dtype)
    n_updates = draw(st.integers(0, 5))
    updates = []
    for _ in range(n_updates):
        keys = draw(st.lists(st.sampled_from(sorted(glob)), unique=True))
        updates.append({k: (rng.standard_normal(glob[k].shape) * 100).astype(glob[k].dtype) for k in keys})
    weights = draw(st.lists(st.floats(0.01, 1000), min_size=n_updates, max_size=n_updates))
    return glob, updates, weights


@settings(max_examples=300, deadline=None)
@given(merge_case())
def test_merge_is_the_weighted_mean_over_holders(case):
    glob, updates, weights = case
    snapshot = {k: v.copy() for k, v in glob.items()}
    merged = merge_partial(glob, updates, weights)
    assert list(merged) == list(glob)
    for key, current in glob.items():
        assert merged[key].dtype == current.dtype and merged[key].shape == current.shape
        holders = [(u[key], w) for u, w in zip(updates, weights) if key in u]
        if not holders:
            assert merged[key].tobytes() == snapshot[key].tobytes()
            continue
        expected = sum(v.astype(np.float64) * w for v, w in holders) / sum(w for _, w in holders)
        if np.issubdtype(current.dtype, np.integer):
            np.testing.assert_allclose(merged[key], expected, atol=0.5 + 1e-9)
        else:
            tol = 1e-2 if current.dtype == np.float16 else 1e-5
            np.testing.assert_allclose(merged[key].astype(np.float64), expected, rtol=tol, atol=tol * 100)
    for key in glob:  # the global state itself is never modified
        assert glob[key].tobytes() == snapshot[key].tobytes()


@pytest.mark.parametrize("num_sub, min_blocks", [(2, 0), (3, 2), (5, 3)])
def test_split_train_merge_round_trip(num_sub, min_blocks):
    spec = ModelSpec(depths=(1, 1, 6, 2), base_width=8, norm="batchnorm-running")
    layout = BlockLayout.from_spec(spec)
    glob = {k: v.numpy().copy() for k, v in build_model(spec).state_dict().items()
            if k in set(layout.payload_keys())}
    groups = sample_subnetworks(layout.partitionable, num_sub, min_blocks, round_rng(1, 1))
    weights = [100.0 * (i + 1) for i in range(num_sub)]
    updates = []
    for i, blocks in enumerate(groups):
        sub = layout.build_subnetwork(spec, blocks)
        sub.load_state_dict({k: torch.from_numpy(glob[k]) for k in layout.payload_keys(blocks)}, strict=False)
        with torch.no_grad():  # "training": a per-client change of every parameter and buffer
            for k, t in sub.state_dict().items():
                t.add_(i + 1)
        updates.append({k: v.numpy() for k, v in sub.state_dict().items() if k in set(layout.payload_keys(blocks))})
    merged = merge_partial(glob, updates, weights)
    for key, value in glob.items():
        holders = [i for i, blocks in enumerate(groups) if key in set(layout.payload_keys(blocks))]
        assert holders, f"{key} held by nobody"
        shift = sum((i + 1) * weights[i] for i in holders) / sum(weights[i] for i in holders)
        expected = value + shift
        if value.dtype == np.int64:
            expected = np.rint(expected)
        np.testing.assert_allclose(merged[key], expected, rtol=1e-5, atol=1e-5, err_msg=key)
