"""scikit-learn's bundled handwritten digits: real images that ship with the install, offline.

1797 grayscale 8x8 images of 10 classes (``sklearn.datasets.load_digits``; pixel values 0..16
scaled to 0..255), split once into 1437 training and 360 test images by a fixed permutation, the
same in every process. The default job's data (``dataset = "digits"``): a run that needs no
network and no file.
"""

from __future__ import annotations

import functools

import numpy as np

from resist_fl.data.arrays import ImageArrays

DIGITS_TRAIN_SIZE = 1437
DIGITS_NUM_CLASSES = 10
DIGITS_CHANNELS = 1
DIGITS_IMAGE_SIZE = 8
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def digits_splits() -> tuple[ImageArrays, ImageArrays]:
    """The training and test splits (uint8 NCHW, int64 labels), read once per process."""
    from sklearn.datasets import load_digits  # scikit-learn is a dependency; imported when used

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    train, test = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    return ImageArrays(images[train], labels[train]), ImageArrays(images[test], labels[test])
