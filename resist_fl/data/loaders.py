"""PyTorch data loaders over in-memory image splits."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.transforms import Normalization, build_transform


def make_train_loader(
    arrays: ImageArrays,
    batch_size: int,
    *,
    normalization: Normalization,
    augment: str = "none",
    seed: int = 0,
) -> DataLoader:
    """Wrap a training split into a shuffling, augmenting data loader.

    Parameters
    ----------
    arrays : ImageArrays
        The split to iterate over.
    batch_size : int
        Samples per batch; the last batch may be smaller, but never a single sample.
    normalization : Normalization
        Per-channel statistics (see :func:`resist_fl.data.normalization`).
    augment : str
        ``none``, ``crop``, ``flip`` or ``crop-flip`` (``auto`` resolved by
        :func:`resist_fl.data.resolve_augment`).
    seed : int
        Seed of the shuffling order. The augmentations draw from torch's global
        random generator.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``(images, labels)`` with float32 NCHW images and int64 labels.
    """
    _, _, height, width = arrays.images.shape
    transform = build_transform(augment, normalization, height, width)
    return DataLoader(
        _TransformedImages(arrays, transform),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        # A last batch of one image cannot train BatchNorm (one value per channel at the last
        # stage's 1x1 maps); it is dropped, a different image each pass.
        drop_last=len(arrays) % batch_size == 1 and len(arrays) > batch_size,
        num_workers=0,
    )


def make_eval_loader(arrays: ImageArrays, batch_size: int, *, normalization: Normalization) -> DataLoader:
    """Wrap an evaluation split into a sequential data loader (no augmentation).

    Yields ``(images, labels)`` with float32 NCHW images and int64 labels.
    """
    _, _, height, width = arrays.images.shape
    transform = build_transform("none", normalization, height, width)
    return DataLoader(_TransformedImages(arrays, transform), batch_size=batch_size, num_workers=0)


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
