"""Device-resident batches: a split kept as a uint8 tensor on the training device, augmented
and normalised as batched tensor ops (no per-sample Python transform, no DataLoader).

One pass of :class:`TrainBatches` reshuffles the split, then each batch is gathered, randomly
cropped and flipped by one gather, and scaled to float32 in one fused multiply-add.
The augmentation has the semantics of the per-sample torchvision pipeline it replaces
(:mod:`resist_fl.data.per_sample`): a crop offset drawn uniformly from ``[0, 2 * padding]`` on each
axis of the zero-padded image, then a horizontal flip with probability 1/2, each image
independently. Random numbers come from generators seeded by ``seed`` on the data's device, so a
CPU run is deterministic for its seed whatever else used torch's global generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.transforms import Normalization, crop_padding

RESOLVED_AUGMENTATIONS = ("none", "crop", "flip", "crop-flip")


@dataclass(frozen=True)
class DeviceImages:
    """A split's uint8 NCHW images and int64 labels, resident on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: ImageArrays, device: torch.device | str = "cpu") -> DeviceImages:
        """Copy ``arrays`` to ``device`` once (uint8: a quarter of the float32 bytes)."""
        images = np.ascontiguousarray(arrays.images, dtype=np.uint8)
        if not images.flags.writeable:  # memory-mapped from the partition cache: one copy in RAM
            images = images.copy()
        images = torch.from_numpy(images)
        labels = torch.from_numpy(np.ascontiguousarray(arrays.labels, dtype=np.int64))
        return cls(images.to(device), labels.to(device))

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return len(self.labels)


def _as_device_images(data: ImageArrays | DeviceImages, device: torch.device | str | None) -> DeviceImages:
    if isinstance(data, DeviceImages):
        if device is not None and torch.device(device) != data.device:
            return DeviceImages(data.images.to(device), data.labels.to(device))
        return data
    return DeviceImages.from_arrays(data, "cpu" if device is None else device)


class _Normalizer:
    """uint8 -> float32 ``(x / 255 - mean) / std`` as one multiply-add per element."""

    def __init__(self, normalization: Normalization, channels: int, device: torch.device) -> None:
        mean = torch.tensor(normalization.mean, dtype=torch.float32)
        std = torch.tensor(normalization.std, dtype=torch.float32)
        if mean.numel() not in (1, channels):
            raise ValueError(f"normalization has {mean.numel()} channels; the images have {channels}")
        self.scale = (1.0 / (255.0 * std)).expand(channels).reshape(1, channels, 1, 1).to(device)
        self.shift = (-mean / std).expand(channels).reshape(1, channels, 1, 1).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)


class TrainBatches:
    """Shuffled, augmented, normalised training batches of a device-resident split.

    Iterating once is one pass over the split (a fresh shuffle each pass); the last batch may
    be smaller, but never a single image (one value per channel cannot train BatchNorm).

    Parameters
    ----------
    data : ImageArrays or DeviceImages
        The split; :class:`ImageArrays` is copied to ``device`` (the CPU when None).
    batch_size : int
        Images per batch.
    normalization : Normalization
        Per-channel statistics of pixel values in [0, 1].
    augment : str
        ``none``, ``crop``, ``flip`` or ``crop-flip`` (``auto`` resolved by
        :func:`resist_fl.data.resolve_augment`).
    seed : int
        Seed of the shuffling order and of the crops and flips.
    device : torch.device or str, optional
        Where the batches live; defaults to where ``data`` is.
    """

    def __init__(self, data: ImageArrays | DeviceImages, batch_size: int, *, normalization: Normalization,
                 augment: str = "none", seed: int = 0, device: torch.device | str | None = None) -> None:
        if augment not in RESOLVED_AUGMENTATIONS:
            raise ValueError(f"augment {augment!r} is not resolved; "
                             f"expected one of {', '.join(RESOLVED_AUGMENTATIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = _as_device_images(data, device)
        self.batch_size = batch_size
        self.augment = augment
        count, channels, height, width = self.data.images.shape
        # drop a last batch of exactly one image (a different image each pass)
        self._count = count - 1 if count % batch_size == 1 and count > batch_size else count
        self._normalize = _Normalizer(normalization, channels, self.data.device)
        self._order = torch.Generator(device=self.data.device).manual_seed(seed)
        self._draws = torch.Generator(device=self.data.device).manual_seed(seed + 0x5EED)
        self._pad = crop_padding(height, width) if augment in ("crop", "crop-flip") else (0, 0)
        # flat offsets of an image's pixels in the padded image (C, H + 2 pad_h, W + 2 pad_w), and
        # of its mirror image: a crop at (top, left) adds top * padded width + left to each
        padded_w = width + 2 * self._pad[1]
        planes = torch.arange(channels).reshape(channels, 1, 1) * (height + 2 * self._pad[0]) * padded_w
        rows = torch.arange(height).reshape(1, height, 1) * padded_w
        cols = torch.arange(width).reshape(1, 1, width)
        self._pixels = (planes + rows + cols).reshape(1, -1).to(self.data.device)
        self._mirrored = (planes + rows + cols.flip(-1)).reshape(1, -1).to(self.data.device)
        self._padded_w = padded_w

    def __len__(self) -> int:
        return -(-self._count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.data), generator=self._order, device=self.data.device)[:self._count]
        for batch in order.split(self.batch_size):
            yield self._normalize(self._augmented(batch)), self.data.labels[batch]

    def _augmented(self, batch: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``batch``, cropped and flipped by one gather of flat offsets."""
        images = self.data.images[batch]
        if self.augment == "none":
            return images
        size = len(batch)
        pad_h, pad_w = self._pad
        device = self.data.device
        index = self._pixels
        if self.augment in ("flip", "crop-flip"):
            flip = torch.rand((size, 1), generator=self._draws, device=device) < 0.5
            index = torch.where(flip, self._mirrored, self._pixels)
        if pad_h or pad_w:
            top = torch.randint(0, 2 * pad_h + 1, (size, 1), generator=self._draws, device=device)
            left = torch.randint(0, 2 * pad_w + 1, (size, 1), generator=self._draws, device=device)
            images = F.pad(images, (pad_w, pad_w, pad_h, pad_h))
            index = index + (top * self._padded_w + left)
        flat = torch.gather(images.reshape(size, -1), 1, index.expand(size, -1))
        return flat.reshape(size, *self.data.images.shape[1:])


class EvalBatches:
    """Sequential normalised batches of a device-resident split (no augmentation)."""

    def __init__(self, data: ImageArrays | DeviceImages, batch_size: int, *, normalization: Normalization,
                 device: torch.device | str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = _as_device_images(data, device)
        self.batch_size = batch_size
        self._normalize = _Normalizer(normalization, self.data.images.shape[1], self.data.device)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.data), self.batch_size):
            stop = start + self.batch_size
            yield self._normalize(self.data.images[start:stop]), self.data.labels[start:stop]
