"""The per-sample torchvision pipeline (a DataLoader applying a transform to one image at a
time), kept as the reference the batched path (:mod:`resist_fl.data.batches`) is tested and
benchmarked against. Training does not use it; importing it imports torchvision."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.transforms import Normalization, crop_padding


def build_transform(augment: str, normalization: Normalization, height: int, width: int) -> v2.Transform:
    """The per-sample transform of uint8 CHW images: ``augment`` (resolved, not ``auto``),
    scaling to [0, 1] and normalisation."""
    if augment not in ("none", "crop", "flip", "crop-flip"):
        raise ValueError(f"augment {augment!r} is not resolved; expected none, crop, flip or crop-flip")
    steps: list[v2.Transform] = []
    if augment in ("crop", "crop-flip"):
        pad_h, pad_w = crop_padding(height, width)
        steps.append(v2.RandomCrop((height, width), padding=[pad_w, pad_h]))
    if augment in ("flip", "crop-flip"):
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(normalization.mean), list(normalization.std))])


def make_per_sample_loader(arrays: ImageArrays, batch_size: int, *, normalization: Normalization,
                           augment: str = "none", seed: int = 0) -> DataLoader:
    """A shuffling DataLoader over ``arrays`` that transforms each image on its own (one
    process, ``num_workers=0``); crops and flips draw from torch's global generator."""
    _, _, height, width = arrays.images.shape
    return DataLoader(_TransformedImages(arrays, build_transform(augment, normalization, height, width)),
                      batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      drop_last=len(arrays) % batch_size == 1 and len(arrays) > batch_size, num_workers=0)


class _TransformedImages(Dataset):
    """A torch dataset over :class:`ImageArrays` with a per-sample transform."""

    def __init__(self, arrays: ImageArrays, transform: v2.Transform) -> None:
        self._images = torch.from_numpy(np.ascontiguousarray(arrays.images))
        self._labels = torch.from_numpy(np.ascontiguousarray(arrays.labels))
        self._transform = transform

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(self._images[index]), self._labels[index]
