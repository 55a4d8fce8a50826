"""A small, learnable, class-conditional image set generated in code.

It needs no files at all and is identical in every process.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.nn import functional as F

from resist_fl.data.arrays import ImageArrays

SYNTHETIC_SEED = 20240601
"""Generator seed of the synthetic set (independent of the partition seed)."""
SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_CHANNELS = 3
SYNTHETIC_IMAGE_SIZE = 32
SYNTHETIC_TRAIN_SIZE = 2000
SYNTHETIC_TEST_SIZE = 500

_SYNTHETIC_GRID = 4  # resolution of the random pattern behind each template
_SYNTHETIC_SHARED = 0.2  # weight of the pattern common to all classes
_SYNTHETIC_AMPLITUDE = 80.0  # template standard deviation, in grey levels
_SYNTHETIC_NOISE = 50.0  # per-pixel Gaussian noise, in grey levels
_SYNTHETIC_MAX_SHIFT = 2  # largest random translation, in pixels
_SYNTHETIC_MAX_BLEND = 0.55  # largest weight of another class's template


@functools.lru_cache(maxsize=1)
def synthetic_splits() -> tuple[ImageArrays, ImageArrays]:
    """Generate the synthetic train and test splits (once per process)."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    templates = _synthetic_templates(rng)
    return (
        _synthetic_split(rng, templates, SYNTHETIC_TRAIN_SIZE),
        _synthetic_split(rng, templates, SYNTHETIC_TEST_SIZE),
    )


def _synthetic_templates(rng: np.random.Generator) -> np.ndarray:
    """Draw one smooth template per class, padded for the random shifts.

    Each template mixes a class-specific and a shared low-resolution Gaussian
    pattern, upsampled bicubically. Returns float32 ``(classes, C, S + 2m, S + 2m)``
    with ``m`` the largest shift and standard deviation ``_SYNTHETIC_AMPLITUDE``.
    """
    grid = (SYNTHETIC_CHANNELS, _SYNTHETIC_GRID, _SYNTHETIC_GRID)
    own = rng.standard_normal((SYNTHETIC_NUM_CLASSES, *grid))
    shared = rng.standard_normal((1, *grid))
    patterns = (1 - _SYNTHETIC_SHARED) * own + _SYNTHETIC_SHARED * shared
    side = SYNTHETIC_IMAGE_SIZE + 2 * _SYNTHETIC_MAX_SHIFT
    smooth = F.interpolate(
        torch.from_numpy(patterns).float(), size=(side, side), mode="bicubic"
    ).numpy()
    return smooth * (_SYNTHETIC_AMPLITUDE / smooth.std())


def _synthetic_split(
    rng: np.random.Generator, templates: np.ndarray, size: int
) -> ImageArrays:
    """Draw ``size`` class-balanced images.

    An image is its class template blended with a random other class's template
    (weight uniform in ``[0, _SYNTHETIC_MAX_BLEND]``; above one half the image
    resembles the wrong class, so no classifier is perfect), randomly shifted,
    plus Gaussian pixel noise.
    """
    num_classes = SYNTHETIC_NUM_CLASSES
    labels = rng.permutation(np.arange(size) % num_classes).astype(np.int64)
    others = (labels + rng.integers(1, num_classes, size=size)) % num_classes
    blend = rng.uniform(0.0, _SYNTHETIC_MAX_BLEND, size=size).astype(np.float32)
    shifts = rng.integers(0, 2 * _SYNTHETIC_MAX_SHIFT + 1, size=(size, 2))
    side = SYNTHETIC_IMAGE_SIZE
    pixels = np.empty((size, SYNTHETIC_CHANNELS, side, side), dtype=np.float32)
    for top, left in np.unique(shifts, axis=0):
        chosen = np.all(shifts == (top, left), axis=1)
        window = templates[:, :, top : top + side, left : left + side]
        own, other = window[labels[chosen]], window[others[chosen]]
        weight = blend[chosen, None, None, None]
        pixels[chosen] = (1 - weight) * own + weight * other
    pixels += rng.normal(0.0, _SYNTHETIC_NOISE, size=pixels.shape).astype(np.float32)
    images = np.clip(np.rint(pixels + 127.5), 0, 255).astype(np.uint8)
    return ImageArrays(images, labels)
