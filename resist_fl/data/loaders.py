"""Training and evaluation batches over image splits (see :mod:`resist_fl.data.batches`)."""

from __future__ import annotations

import torch

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.batches import DeviceImages, EvalBatches, TrainBatches
from resist_fl.data.transforms import Normalization


def make_train_loader(data: ImageArrays | DeviceImages, batch_size: int, *, normalization: Normalization,
                      augment: str = "none", seed: int = 0, device: torch.device | str | None = None,
                      crop_size: int | None = None) -> TrainBatches:
    """Shuffled, augmented, normalised training batches of ``data``, resident on ``device``.

    Parameters
    ----------
    data : ImageArrays or DeviceImages
        The split; a :class:`DeviceImages` already on ``device`` is used without a copy.
    batch_size : int
        Samples per batch; the last batch may be smaller, but never a single sample.
    normalization : Normalization
        Per-channel statistics (see :func:`resist_fl.data.normalization`).
    augment : str
        ``none``, ``crop``, ``flip``, ``crop-flip``, ``resized-crop`` or ``resized-crop-flip``
        (``auto`` resolved by :func:`resist_fl.data.resolve_augment`).
    seed : int
        Seed of the shuffling order and of the random crops and flips.
    device : torch.device or str, optional
        The training device (default: where ``data`` is, the CPU for :class:`ImageArrays`).
    crop_size : int, optional
        Side of the batches' images when the stored ones are larger (``imagefolder``).

    Returns
    -------
    TrainBatches
        Each pass yields ``(images, labels)``: float32 NCHW images and int64 labels on ``device``.
    """
    return TrainBatches(data, batch_size, normalization=normalization, augment=augment, seed=seed, device=device,
                        crop_size=crop_size)


def make_eval_loader(data: ImageArrays | DeviceImages, batch_size: int, *, normalization: Normalization,
                     device: torch.device | str | None = None) -> EvalBatches:
    """Sequential normalised batches of ``data`` on ``device`` (no augmentation).

    Yields ``(images, labels)`` with float32 NCHW images and int64 labels.
    """
    return EvalBatches(data, batch_size, normalization=normalization, device=device)
