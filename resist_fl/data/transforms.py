"""Augmentation chosen to fit the data, normalisation from the data.

CIFAR's recipe (a random crop after padding by 1/8 of the side, and a
horizontal flip) suits natural photographs; it destroys small images, digits,
text and anything that is not mirror-symmetric. So augmentation is a choice,
:data:`AUGMENTATIONS`, whose ``auto`` applies CIFAR's recipe only to the data
sets it was made for, and normalisation uses CIFAR's constants for CIFAR and
the training images' own per-channel mean and standard deviation otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AUGMENTATIONS = ("auto", "none", "crop", "flip", "crop-flip", "resized-crop", "resized-crop-flip")
"""``auto``: ``crop-flip`` for cifar10, cifar100 and synthetic, ``resized-crop-flip`` for an
imagefolder directory, ``none`` for a user's own npz images; ``crop``: a random crop after
padding each side by 1/8 of it (4 px at 32 px); ``flip``: a random horizontal flip;
``resized-crop``: torchvision's ``RandomResizedCrop`` (area 8-100 %, aspect 3/4-4/3, resized to
the image size)."""

AUTO_AUGMENT = {"digits": "none", "fashion-mnist": "none", "mnist": "none", "cifar10": "crop-flip",
                "cifar100": "crop-flip", "synthetic": "crop-flip", "npz": "none",
                "imagefolder": "resized-crop-flip"}
CROP_PADDING_FRACTION = 1 / 8
"""Padding of the random crop, as a fraction of the image side (CIFAR: 4 px of 32)."""
_CHUNK = 4096  # images per step when computing statistics


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of pixel values scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_NORMALIZATION = {
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def resolve_augment(augment: str, dataset: str) -> str:
    """The augmentation ``augment`` stands for on ``dataset`` (``auto`` resolved)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTATIONS)}")
    return AUTO_AUGMENT[dataset] if augment == "auto" else augment


def crop_padding(height: int, width: int) -> tuple[int, int]:
    """Padding (top/bottom, left/right) of the random crop: 1/8 of each side, at least 1 px."""
    return (max(1, round(height * CROP_PADDING_FRACTION)), max(1, round(width * CROP_PADDING_FRACTION)))


def image_statistics(images: np.ndarray) -> Normalization:
    """Per-channel mean and standard deviation of uint8 NCHW ``images``, scaled to [0, 1].

    Computed in chunks with float64 sums, so a large set needs no float copy.
    A constant channel gets a standard deviation of 1 (no division by zero).
    """
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start:start + _CHUNK].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) if s > 1e-6 else 1.0 for s in std))
