"""Device-resident batches: a split kept as a uint8 tensor on the training device, augmented
and normalised as batched tensor ops (no per-sample Python transform, no DataLoader).

One pass of :class:`TrainBatches` reshuffles the split, then each batch is gathered, randomly
cropped and flipped by one gather, and scaled to float32 in one fused multiply-add.
The augmentation has the semantics of the per-sample torchvision pipeline it replaces
(:mod:`benchmarks.per_sample_loader`): a crop offset drawn uniformly from ``[0, 2 * padding]`` on each
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

RESOLVED_AUGMENTATIONS = ("none", "crop", "flip", "crop-flip", "resized-crop", "resized-crop-flip")
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
"""torchvision's ``RandomResizedCrop`` defaults: area fraction and aspect ratio of the box."""
_RESIZED_CROP_ATTEMPTS = 10


def random_resized_boxes(count: int, height: int, width: int, generator: torch.Generator,
                         device: torch.device) -> torch.Tensor:
    """``count`` crop boxes ``(top, left, box_height, box_width)`` drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws one: up to ten tries of an area fraction uniform in
    :data:`RESIZED_CROP_SCALE` and a log-uniform aspect ratio in :data:`RESIZED_CROP_RATIO`, the
    first box that fits kept, else the central box of the closest allowed ratio; the position
    uniform over the places the box fits. All images at once."""
    shape = (count, _RESIZED_CROP_ATTEMPTS)
    area = height * width * torch.empty(shape, device=device).uniform_(*RESIZED_CROP_SCALE, generator=generator)
    log_ratio = torch.empty(shape, device=device).uniform_(*np.log(RESIZED_CROP_RATIO), generator=generator)
    box_w = torch.sqrt(area * torch.exp(log_ratio)).round()
    box_h = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (box_w > 0) & (box_h > 0) & (box_w <= width) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits
    box_w, box_h = box_w.gather(1, first).squeeze(1), box_h.gather(1, first).squeeze(1)
    ratio = width / height  # fallback: the whole image, cut to the nearest allowed ratio
    if ratio < RESIZED_CROP_RATIO[0]:
        fallback = (round(width / RESIZED_CROP_RATIO[0]), width)
    elif ratio > RESIZED_CROP_RATIO[1]:
        fallback = (height, round(height * RESIZED_CROP_RATIO[1]))
    else:
        fallback = (height, width)
    found = fits.any(dim=1)
    box_h = torch.where(found, box_h, float(fallback[0]))
    box_w = torch.where(found, box_w, float(fallback[1]))
    top = torch.floor(torch.rand(count, device=device, generator=generator) * (height - box_h + 1))
    left = torch.floor(torch.rand(count, device=device, generator=generator) * (width - box_w + 1))
    top = torch.where(found, top, torch.div(height - box_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - box_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, box_h, box_w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box (:func:`random_resized_boxes`) resized to ``size`` x ``size`` by bilinear
    interpolation, as torchvision's ``resized_crop`` (without antialiasing) samples it: pixel
    centres mapped into the box and clamped to it. One ``grid_sample`` for the batch; mirrored
    where ``flip``; float32 in the images' value range."""
    count, _, height, width = images.shape
    top, left, box_h, box_w = (v.unsqueeze(1) for v in boxes.unbind(1))
    steps = torch.arange(size, device=images.device, dtype=torch.float32) + 0.5
    xs = torch.minimum(torch.maximum(left + steps * box_w / size - 0.5, left), left + box_w - 1)
    ys = torch.minimum(torch.maximum(top + steps * box_h / size - 0.5, top), top + box_h - 1)
    if flip is not None:
        xs = torch.where(flip.unsqueeze(1), xs.flip(1), xs)
    grid = torch.stack([((2 * xs + 1) / width - 1).unsqueeze(1).expand(count, size, size),
                        ((2 * ys + 1) / height - 1).unsqueeze(2).expand(count, size, size)], dim=-1)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


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
        ``none``, ``crop``, ``flip``, ``crop-flip``, ``resized-crop`` or ``resized-crop-flip``
        (``auto`` resolved by :func:`resist_fl.data.resolve_augment`).
    seed : int
        Seed of the shuffling order and of the crops and flips.
    device : torch.device or str, optional
        Where the batches live; defaults to where ``data`` is.
    crop_size : int, optional
        Side of the square images the batches hold when the stored images are larger (an
        ``imagefolder`` split): the random-resized crop's output size, else a centre crop
        taken before the other augmentations. None: the stored size.
    drop_last : bool
        Every batch has exactly ``batch_size`` images (each pass leaves out a different short
        remainder; a split smaller than one batch is one batch): one input shape for a GPU's
        kernels. Off: the last batch may be smaller (never a single image).
    """

    def __init__(self, data: ImageArrays | DeviceImages, batch_size: int, *, normalization: Normalization,
                 augment: str = "none", seed: int = 0, device: torch.device | str | None = None,
                 crop_size: int | None = None, drop_last: bool = False) -> None:
        if augment not in RESOLVED_AUGMENTATIONS:
            raise ValueError(f"augment {augment!r} is not resolved; "
                             f"expected one of {', '.join(RESOLVED_AUGMENTATIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = _as_device_images(data, device)
        self.batch_size = batch_size
        self.augment = augment
        count, channels, height, width = self.data.images.shape
        if crop_size is not None and not 0 < crop_size <= min(height, width):
            raise ValueError(f"crop_size = {crop_size}: expected 1 to {min(height, width)} (the stored images "
                             f"are {height}x{width})")
        self.crop_size = crop_size or None
        self._center = None  # (top, left, side) of a centre crop taken first
        if self.crop_size and not augment.startswith("resized-crop") and (height, width) != (crop_size,) * 2:
            self._center = ((height - crop_size) // 2, (width - crop_size) // 2, crop_size)
            height = width = crop_size
        # drop a last batch of exactly one image (a different image each pass), or any short one
        self._count = count - 1 if count % batch_size == 1 and count > batch_size else count
        if drop_last and count >= batch_size:
            self._count = count - count % batch_size
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
        self._pixels_shape = (height, width)

    def __len__(self) -> int:
        return -(-self._count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.data), generator=self._order, device=self.data.device)[:self._count]
        for batch in order.split(self.batch_size):
            yield self._normalize(self._augmented(batch)), self.data.labels[batch]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised, augmented images at ``indices`` and their labels (one batch of any
        composition: DP-SGD's Poisson-sampled batches, :mod:`resist_fl.node.local_dp`)."""
        return self._normalize(self._augmented(indices)), self.data.labels[indices]

    def _augmented(self, batch: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``batch``, cropped and flipped by one gather of flat offsets."""
        images = self.data.images[batch]
        if self._center:
            top, left, side = self._center
            images = images[..., top:top + side, left:left + side].contiguous()
        if self.augment == "none":
            return images
        size = len(batch)
        pad_h, pad_w = self._pad
        device = self.data.device
        if self.augment.startswith("resized-crop"):
            _, _, height, width = images.shape
            boxes = random_resized_boxes(size, height, width, self._draws, device)
            flip = (torch.rand(size, generator=self._draws, device=device) < 0.5
                    if self.augment == "resized-crop-flip" else None)
            return resized_crops(images, boxes, self.crop_size or height, flip)
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
        return flat.reshape(size, -1, self._pixels_shape[0], self._pixels_shape[1])


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
