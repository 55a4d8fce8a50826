"""Which data sets exist, what their samples look like, and their test and training sets.

``cifar10`` / ``cifar100``
    CIFAR from the Hugging Face hub through flwr-datasets (:mod:`.hub`).
``npz``
    A user's own images in a local ``.npz`` file (:mod:`.npz`).
``digits``
    scikit-learn's bundled 8x8 handwritten digits: real images, offline (:mod:`.digits`).
``fashion-mnist`` / ``mnist``
    The original IDX files, from ``data-path``, torchvision's layout under it, Debian's
    ``dataset-fashion-mnist`` package (offline) or the hub (:mod:`.idx`).
``synthetic``
    A small learnable image set generated in code (:mod:`.synthetic`).
``imagefolder``
    A local ImageFolder-style directory, ImageNet's layout (:mod:`.imagefolder`); images of
    ``image_size`` (224 by default).

A run with ``validation_size > 0`` holds that many training images out (:func:`held_out`): its
training set is the rest and its "test set" the held-out images, so a tuned run is never evaluated
on the test images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from resist_fl.data.arrays import DataError, DatasetInfo, ImageArrays
from resist_fl.data.digits import DIGITS_CHANNELS, DIGITS_IMAGE_SIZE, DIGITS_NUM_CLASSES, digits_splits
from resist_fl.data.idx import IDX_CHANNELS, IDX_DATASETS, IDX_IMAGE_SIZE, IDX_NUM_CLASSES, idx_source_key, idx_splits
from resist_fl.data.hub import (CIFAR_CHANNELS, CIFAR_IMAGE_SIZE, HUB_DATASETS, hub_test_set, hub_train_images,
                                hub_train_labels)
from resist_fl.data.imagefolder import evaluation_crop, imagefolder_source_key, imagefolder_splits
from resist_fl.data.npz import npz_source_key, npz_splits
from resist_fl.data.synthetic import (
    SYNTHETIC_CHANNELS,
    SYNTHETIC_IMAGE_SIZE,
    SYNTHETIC_NUM_CLASSES,
    synthetic_splits,
)
from resist_fl.data.transforms import CIFAR_NORMALIZATION, Normalization, image_statistics

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic", "npz", "imagefolder")

_STATISTICS: dict[object, Normalization] = {}  # per data source, computed once per process
_HUB_HELD_OUT: dict[tuple[str, int], ImageArrays] = {}

VALIDATION_DRAW = 34
"""Seed of the draw of the held-out validation images: a constant, so every run seed (and every
node) holds out the same images of the same training set."""


def held_out(labels: np.ndarray, validation_size: int) -> np.ndarray:
    """Sorted indices of the ``validation_size`` training images (of labels ``labels``) held out: a fixed
    draw stratified by label (the images in a fixed random order, grouped by label, taken at evenly spaced
    positions), so every label keeps its share of the set, to within one image.

    Raises
    ------
    DataError
        ``validation_size`` is fewer than the labels present or more than half of the training set.
    """
    labels = np.asarray(labels)
    classes = len(np.unique(labels))
    if not classes <= validation_size <= len(labels) // 2:
        raise DataError(f"validation-size = {validation_size}: expected {classes} .. {len(labels) // 2} (at least one "
                        f"image per label present, at most half of the {len(labels)} training images, so that the "
                        "nodes keep the larger part)")
    order = np.random.default_rng(VALIDATION_DRAW).permutation(len(labels))
    by_label = order[np.argsort(labels[order], kind="stable")]
    positions = ((np.arange(validation_size) + 0.5) * len(labels) / validation_size).astype(np.int64)
    return np.sort(by_label[positions])


def hub_held_out(dataset: str, validation_size: int) -> ImageArrays:
    """The held-out images of a hub dataset's training split (decoded once per process)."""
    if (dataset, validation_size) not in _HUB_HELD_OUT:
        chosen = held_out(hub_train_labels(dataset), validation_size)
        _HUB_HELD_OUT[dataset, validation_size] = hub_train_images(dataset, chosen)
    held = _HUB_HELD_OUT[dataset, validation_size]
    return held.subset(np.arange(len(held)))


def kept(labels: np.ndarray, validation_size: int) -> np.ndarray:
    """Sorted indices of the training images the nodes train on: all of them, or all but :func:`held_out`."""
    if not validation_size:
        return np.arange(len(labels))
    return np.setdiff1d(np.arange(len(labels)), held_out(labels, validation_size))


def check_choice(kind: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


def dataset_info(dataset: str, data_path: str = "", image_size: int = 224) -> DatasetInfo:
    """Describe the samples of ``dataset`` (only ``npz`` reads data).

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    data_path : str
        Absolute path of the ``.npz`` file or the image directory (``npz``, ``imagefolder``).
    image_size : int
        The crop ``imagefolder`` images are evaluated at (and trained at).
    """
    check_choice("dataset", dataset, DATASETS)
    if dataset in HUB_DATASETS:
        return DatasetInfo(HUB_DATASETS[dataset].num_classes, CIFAR_CHANNELS, (CIFAR_IMAGE_SIZE,) * 2)
    if dataset == "synthetic":
        return DatasetInfo(SYNTHETIC_NUM_CLASSES, SYNTHETIC_CHANNELS, (SYNTHETIC_IMAGE_SIZE,) * 2)
    if dataset == "digits":
        return DatasetInfo(DIGITS_NUM_CLASSES, DIGITS_CHANNELS, (DIGITS_IMAGE_SIZE,) * 2)
    if dataset in IDX_DATASETS:
        return DatasetInfo(IDX_NUM_CLASSES, IDX_CHANNELS, (IDX_IMAGE_SIZE,) * 2)
    train, test = local_splits(dataset, data_path, image_size)
    _, channels, height, width = test.images.shape
    return DatasetInfo(int(max(train.labels.max(), test.labels.max())) + 1, channels, (height, width))


def local_splits(dataset: str, data_path: str, image_size: int = 224) -> tuple[ImageArrays, ImageArrays]:
    """Training and test splits of the data sets read from local files (``npz``, ``imagefolder``)."""
    if dataset == "imagefolder":
        return imagefolder_splits(data_path, image_size)
    return npz_splits(data_path)


def load_test_set(dataset: str, data_path: str = "", image_size: int = 224, validation_size: int = 0) -> ImageArrays:
    """A fresh copy of the centralised test set of ``dataset`` (the hub's ``'test'`` split for CIFAR),
    or with ``validation_size > 0`` of the training images held out as the validation set."""
    check_choice("dataset", dataset, DATASETS)
    if validation_size:
        if dataset in HUB_DATASETS:
            return hub_held_out(dataset, validation_size)
        train = local_train_set(dataset, data_path, image_size)[0]
        held = train.subset(held_out(train.labels, validation_size))
        return evaluation_crop(held, image_size) if dataset == "imagefolder" else held
    if dataset in HUB_DATASETS:
        test = hub_test_set(dataset)
    elif dataset == "synthetic":
        test = synthetic_splits()[1]
    elif dataset == "digits":
        test = digits_splits()[1]
    elif dataset in IDX_DATASETS:
        test = idx_splits(dataset, data_path)[1]
    else:
        test = local_splits(dataset, data_path, image_size)[1]
    return test.subset(np.arange(len(test)))


def local_train_set(dataset: str, data_path: str, image_size: int = 224,
                    validation_size: int = 0) -> tuple[ImageArrays, object]:
    """The training set of a data set held in memory (every one but the hub's CIFAR), without the
    images :func:`held_out` of it when ``validation_size > 0``, and a key naming its contents."""
    train, key = _whole_train_set(dataset, data_path, image_size)
    if not validation_size:
        return train, key
    return train.subset(kept(train.labels, validation_size)), kept_key(key, validation_size)


def kept_key(key: object, validation_size: int) -> object:
    """The key naming a training set's kept images (``key``: the whole set's)."""
    return (key, "validation", validation_size) if validation_size else key


def _whole_train_set(dataset: str, data_path: str, image_size: int) -> tuple[ImageArrays, object]:
    if dataset == "synthetic":
        return synthetic_splits()[0], "synthetic"
    if dataset == "digits":
        return digits_splits()[0], "digits"
    if dataset in IDX_DATASETS:
        return idx_splits(dataset, data_path)[0], idx_source_key(dataset, data_path)
    if dataset == "imagefolder":
        return imagefolder_splits(data_path, image_size)[0], imagefolder_source_key(data_path, image_size)
    return npz_splits(data_path)[0], npz_source_key(data_path)


def normalization(dataset: str, data_path: str = "", image_size: int = 224, validation_size: int = 0) -> Normalization:
    """The normalisation of ``dataset``: CIFAR's constants for CIFAR, otherwise the per-channel
    mean and standard deviation of the whole training set (the npz file's ``x_train``: the
    same on every node that reads the same file; without the held-out validation images)."""
    check_choice("dataset", dataset, DATASETS)
    if dataset in CIFAR_NORMALIZATION:
        return CIFAR_NORMALIZATION[dataset]
    train, whole = _whole_train_set(dataset, data_path, image_size)
    key = kept_key(whole, validation_size)
    if key not in _STATISTICS:  # (the kept images are drawn and copied once, not at every call)
        kept_images = train.images[kept(train.labels, validation_size)] if validation_size else train.images
        _STATISTICS[key] = image_statistics(kept_images)
    return _STATISTICS[key]

