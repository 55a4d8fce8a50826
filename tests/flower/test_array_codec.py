"""The server's fast Array <-> NumPy conversion reads and writes exactly what Flower's does."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from resist_fl.flower.array_codec import array_of, array_view

ARRAYS = [np.random.default_rng(0).random((3, 4), dtype=np.float32), np.array(3.0), np.arange(10),
          np.zeros((0, 3)), np.ones((2, 3, 4), np.float16), np.array([True, False]),
          np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::2]]  # not contiguous


@pytest.mark.parametrize("values", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_array_of_writes_flowers_bytes_and_array_view_reads_them(values: np.ndarray) -> None:
    ours, flowers = array_of(values), Array(np.require(values, requirements="C"))
    assert (ours.data, ours.shape, ours.dtype, ours.stype) == (flowers.data, flowers.shape, flowers.dtype,
                                                               flowers.stype)
    view = array_view(flowers)
    np.testing.assert_array_equal(view, values)
    assert view.dtype == values.dtype and view.shape == values.shape
    assert not view.flags.writeable  # a view of the message's bytes: never written through


def test_array_view_leaves_unusual_arrays_to_flowers_reader() -> None:
    fortran = Array(np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    np.testing.assert_array_equal(array_view(fortran), np.arange(6.0).reshape(2, 3))
    truncated = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=Array(np.zeros(4, np.float32)).data[:-4])
    with pytest.raises(ValueError):
        array_view(truncated)  # Flower's own reader refuses it
    not_npy = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"garbage")
    with pytest.raises(ValueError):
        array_view(not_npy)
