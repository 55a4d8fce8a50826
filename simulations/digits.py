"""scikit-learn's bundled 8x8 handwritten digits as a user's ``.npz``: a real image set offline.

1797 grayscale images of 10 classes, written uint8 NHW (pixel values 0..16 scaled to 0..255)
with a fixed 1437 / 360 train / test split. Needs scikit-learn (the ``dev`` extra)::

    python -m simulations.digits /abs/path/digits.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TRAIN_SIZE = 1437


def write_digits_npz(path: Path | str) -> str:
    """Write the digits to ``path`` (keys x_train, y_train, x_test, y_test); return the path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    np.savez(path, x_train=images[train], y_train=digits.target[train],
             x_test=images[test], y_test=digits.target[test])
    return str(path)


if __name__ == "__main__":
    print(write_digits_npz(Path(sys.argv[1]).resolve()))
