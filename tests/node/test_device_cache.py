"""The decoded-partition cache is bounded by bytes on the training device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resist_fl.data.arrays import ImageArrays
from resist_fl.node.device_cache import DeviceCache, nbytes


def _arrays(count: int) -> ImageArrays:
    return ImageArrays(np.zeros((count, 1, 8, 8), np.uint8), np.zeros(count, np.int64))


def test_partitions_beyond_the_bound_stay_on_the_host():
    one = 10 * 64 + 10 * 8  # ten 8x8 uint8 images and their int64 labels
    cache = DeviceCache(torch.device("meta"), max_bytes=2 * one)  # "meta" stands in for a GPU
    first, second = cache.get("a", lambda: _arrays(10)), cache.get("b", lambda: _arrays(10))
    assert first.device.type == second.device.type == "meta" and cache.device_bytes == 2 * one == nbytes(first) * 2
    third = cache.get("c", lambda: _arrays(10))  # no room: the least recently used makes way
    assert third.device.type == "meta" and "a" not in cache.entries and list(cache.entries) == ["b", "c"]
    assert cache.device_bytes == 2 * one
    big = cache.get("big", lambda: _arrays(100))  # larger than the whole bound: stays on the host
    assert big.device.type == "cpu" and cache.device_bytes == 2 * one  # and evicts nothing


def test_a_cached_partition_is_decoded_once():
    calls = []
    cache = DeviceCache(torch.device("cpu"), max_bytes=0)
    for _ in range(3):
        cache.get("a", lambda: calls.append(1) or _arrays(4))
    assert len(calls) == 1 and cache.device_bytes == nbytes(cache.entries["a"])
    with pytest.raises(ValueError, match="device-cache-mb"):
        DeviceCache(torch.device("cpu"), -1)
