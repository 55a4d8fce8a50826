"""A node's decoded training partitions, kept between messages and bounded by bytes on the device.

A ClientApp process may serve several partitions (simulation: many virtual clients per process),
and keeping each decoded partition on the training device saves a copy per round. Several
processes can share one GPU, so what each keeps there is bounded by ``max_bytes``: the least
recently used device-resident partitions make room first (they are dropped, and decoded again from
the node's partition cache if needed), and a partition larger than the whole bound stays in host
memory (pinned on CUDA, so its batches copy asynchronously). :attr:`device_bytes` is what
the cache holds on the device now (reported as ``device-cache-mb``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.batches import DeviceImages

MAX_ENTRIES = 8
"""Most partitions kept at all (device and host together), the least recently used dropped first."""


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked host memory when CUDA is there to use it."""
    return tensor.cpu().pin_memory() if torch.cuda.is_available() else tensor.cpu()


def nbytes(images: DeviceImages) -> int:
    return images.images.numel() * images.images.element_size() + images.labels.numel() * 8


class DeviceCache:
    """Decoded partitions by key: on ``device`` up to ``max_bytes`` in all, the rest on the host."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"device-cache-mb: expected >= 0, got {max_bytes / 2**20:g}")
        self.device, self.max_bytes = torch.device(device), int(max_bytes)
        self.entries: OrderedDict[Hashable, DeviceImages] = OrderedDict()

    @property
    def device_bytes(self) -> int:
        return sum(nbytes(e) for e in self.entries.values() if e.device.type == self.device.type)

    def get(self, key: Hashable, load: Callable[[], ImageArrays]) -> DeviceImages:
        """The partition ``key`` (decoded by ``load`` the first time)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        host = DeviceImages.from_arrays(load(), "cpu")
        size = nbytes(host)
        if self.device.type == "cpu":
            entry = host
        else:
            while size <= self.max_bytes < self.device_bytes + size and self._evict_one_from_device():
                pass
            if self.device_bytes + size <= self.max_bytes:
                entry = DeviceImages(host.images.to(self.device), host.labels.to(self.device))
            else:  # over the bound: stays in pinned host memory; batches copy to the device
                entry = DeviceImages(_pinned(host.images), _pinned(host.labels))
        self.entries[key] = entry
        while len(self.entries) > MAX_ENTRIES:
            self.entries.popitem(last=False)
        return entry

    def _evict_one_from_device(self) -> bool:
        """Drop the least recently used device-resident partition."""
        for key, entry in self.entries.items():
            if entry.device.type == self.device.type:
                del self.entries[key]
                return True
        return False
