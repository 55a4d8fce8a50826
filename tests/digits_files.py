"""Test data: scikit-learn's bundled 8x8 handwritten digits written as a user's own files.

The same 1797 images and 1437 / 360 split as the built-in ``dataset='digits'``
(:mod:`resist_fl.data.digits`), written uint8 NHW as an ``.npz`` or as an ImageFolder tree, so the
tests train on a real image set through the path a user's own files take.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resist_fl.data.digits import digits_splits


def write_digits_npz(path: Path | str) -> str:
    """Write the digits to ``path`` (keys x_train, y_train, x_test, y_test); return the path."""
    train, test = digits_splits()  # the project's own split (dataset='digits' trains on the same images)
    np.savez(path, x_train=train.images[:, 0], y_train=train.labels, x_test=test.images[:, 0], y_test=test.labels)
    return str(path)


def write_digits_imagefolder(root: Path | str) -> str:
    """Write the same train/test split as PNG files in an ImageFolder layout
    (``root/train/<digit>/<i>.png``, ``root/val/<digit>/<i>.png``); return the root."""
    from PIL import Image

    root = Path(root)
    with np.load(write_digits_npz(root.with_suffix(".npz"))) as digits:
        for split, images, labels in (("train", digits["x_train"], digits["y_train"]),
                                      ("val", digits["x_test"], digits["y_test"])):
            for index, (image, label) in enumerate(zip(images, labels)):
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{index}.png")
    return str(root)
