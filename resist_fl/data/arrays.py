"""In-memory image splits and conversions into them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets


class DataError(ValueError):
    """A data set that cannot be used as it is; the message names the file or
    source, the key and what was expected, and what to do instead."""


@dataclass(frozen=True)
class DatasetInfo:
    """Shape of a dataset's samples.

    Attributes
    ----------
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    in_channels : int
        Image channels (1 or 3).
    image_shape : tuple of int
        Image height and width.
    """

    num_classes: int
    in_channels: int
    image_shape: tuple[int, int]


@dataclass(frozen=True)
class ImageArrays:
    """An in-memory image split.

    Attributes
    ----------
    images : numpy.ndarray
        uint8 images of shape ``(N, C, H, W)``.
    labels : numpy.ndarray
        int64 labels of shape ``(N,)``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 NCHW array, got dtype {self.images.dtype} "
                f"and shape {self.images.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be an int64 array of shape ({len(self.images)},), got "
                f"dtype {self.labels.dtype} and shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageArrays:
        """Return a copy holding the samples at ``indices``."""
        return ImageArrays(self.images[indices], self.labels[indices])


def arrays_from_hf(
    hf_dataset: datasets.Dataset, image_column: str, label_column: str
) -> ImageArrays:
    """Convert a Hugging Face dataset of images into :class:`ImageArrays`.

    Parameters
    ----------
    hf_dataset : datasets.Dataset
        Rows with a PIL image (or array) column and an integer label column.
    image_column, label_column : str
        Names of the two columns.

    Returns
    -------
    ImageArrays
        The images as uint8 NCHW and the labels as int64.
    """
    images = np.stack([np.asarray(image) for image in hf_dataset[image_column]])
    labels = np.asarray(hf_dataset[label_column], dtype=np.int64)
    return ImageArrays(to_nchw(images), labels)


def to_nchw(images: np.ndarray) -> np.ndarray:
    """Return images in contiguous NCHW layout.

    Parameters
    ----------
    images : numpy.ndarray
        NHWC (last axis 1 or 3), NCHW (axis 1 of size 1 or 3) or grayscale NHW.
        NHWC wins when both readings are possible.

    Returns
    -------
    numpy.ndarray
        The images with shape ``(N, C, H, W)``.
    """
    if images.ndim == 3:
        return np.ascontiguousarray(images[:, None])
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return np.ascontiguousarray(images)
    raise ValueError(
        f"cannot read images of shape {images.shape}: expected NHWC or NCHW with "
        "1 or 3 channels, or grayscale NHW"
    )
