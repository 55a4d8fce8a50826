"""Image datasets, federated partitions and PyTorch data loaders.

Four data sources are supported:

``cifar10`` / ``cifar100``
    CIFAR from the Hugging Face hub through :class:`flwr_datasets.FederatedDataset`
    (needs network access or a populated Hugging Face cache).
``npz``
    A local ``.npz`` file with ``x_train``, ``y_train``, ``x_test`` and ``y_test``
    (uint8 images, NHWC, NCHW or grayscale NHW; integer labels).
``synthetic``
    A small, learnable, class-conditional image set generated in code; it needs no
    files at all and is identical in every process.

Every source is split into federated partitions with the flwr-datasets
:class:`~flwr_datasets.partitioner.IidPartitioner` or
:class:`~flwr_datasets.partitioner.DirichletPartitioner`. Splits are returned as
in-memory :class:`ImageArrays` (uint8 NCHW images, int64 labels), which
:func:`make_train_loader` and :func:`make_eval_loader` wrap into data loaders.

Loaded data is cached per process, so repeated calls (one per round and client
in a simulation) do not reload or regenerate anything. Returned arrays are
always fresh copies and may be modified freely.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

DATASETS = ("cifar10", "cifar100", "synthetic", "npz")
PARTITIONERS = ("iid", "dirichlet")

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""Arrays a ``dataset='npz'`` file must contain."""

DIRICHLET_MIN_PARTITION_SIZE = 1
"""Smallest Dirichlet partition; resampled until every client has data."""

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

_CIFAR_IMAGE_SIZE = 32
_CIFAR_CHANNELS = 3


@dataclass(frozen=True)
class _HubSpec:
    """Where a hub dataset lives and how its columns are named."""

    hub_id: str
    image_column: str
    label_column: str
    num_classes: int


_HUB_DATASETS = {
    "cifar10": _HubSpec("uoft-cs/cifar10", "img", "label", 10),
    "cifar100": _HubSpec("uoft-cs/cifar100", "img", "fine_label", 100),
}

_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_DEFAULT_MEAN_STD = 0.5


@dataclass(frozen=True)
class DatasetInfo:
    """Shape of a dataset's samples.

    Attributes
    ----------
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    in_channels : int
        Image channels (1 or 3).
    image_size : int
        Image height, equal to the width.
    """

    num_classes: int
    in_channels: int
    image_size: int


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


# Per-process caches, keyed by everything that determines their contents.
_FEDERATED_DATASETS: dict[tuple[str, int, str, float, int], FederatedDataset] = {}
_HUB_TEST_SETS: dict[str, ImageArrays] = {}
_INDEX_PARTITIONERS: dict[tuple[object, ...], Partitioner] = {}


# --------------------------------------------------------------------------- API


def dataset_info(dataset: str, data_path: str = "") -> DatasetInfo:
    """Describe the samples of ``dataset``.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    data_path : str
        Absolute path of the ``.npz`` file; only used when ``dataset='npz'``.

    Returns
    -------
    DatasetInfo
        Number of classes, channels and image size. Only ``npz`` reads data.
    """
    _check_choice("dataset", dataset, DATASETS)
    if dataset in _HUB_DATASETS:
        spec = _HUB_DATASETS[dataset]
        return DatasetInfo(spec.num_classes, _CIFAR_CHANNELS, _CIFAR_IMAGE_SIZE)
    if dataset == "synthetic":
        return DatasetInfo(
            SYNTHETIC_NUM_CLASSES, SYNTHETIC_CHANNELS, SYNTHETIC_IMAGE_SIZE
        )
    train, test = _npz_splits(data_path)
    num_classes = (
        int(max(train.labels.max(initial=-1), test.labels.max(initial=-1))) + 1
    )
    return DatasetInfo(num_classes, train.images.shape[1], train.images.shape[2])


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    data_path: str = "",
) -> ImageArrays:
    """Load one federated partition of a training set.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    partition_id : int
        The partition to load, in ``[0, num_partitions)``.
    num_partitions : int
        Number of partitions the training set is split into (at least 1).
    partitioner : str
        ``'iid'`` (equal random shards) or ``'dirichlet'`` (label skew).
    alpha : float
        Dirichlet concentration; smaller is more skewed. Ignored for ``'iid'``.
    seed : int
        Seed of the shuffling and of the Dirichlet sampling.
    data_path : str
        Absolute path of the ``.npz`` file; only used when ``dataset='npz'``.

    Returns
    -------
    ImageArrays
        The partition's images and labels.

    Raises
    ------
    ValueError
        For an unknown dataset or partitioner, or an invalid partition id.
    RuntimeError
        When a hub dataset cannot be loaded (e.g. offline).
    """
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("partitioner", partitioner, PARTITIONERS)
    _check_partition_id(partition_id, num_partitions)
    if dataset in _HUB_DATASETS:
        spec = _HUB_DATASETS[dataset]
        fds = _federated_dataset(dataset, num_partitions, partitioner, alpha, seed)
        return arrays_from_hf(
            fds.load_partition(partition_id, "train"),
            spec.image_column,
            spec.label_column,
        )
    train, source = _local_train_set(dataset, data_path)
    split = _index_partitioner(
        source, train.labels, num_partitions, partitioner, alpha, seed
    )
    indices = split.load_partition(partition_id).with_format("numpy")[:]["idx"]
    return train.subset(indices)


def load_test_set(dataset: str, data_path: str = "") -> ImageArrays:
    """Load the centralised test set of ``dataset``.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASETS`.
    data_path : str
        Absolute path of the ``.npz`` file; only used when ``dataset='npz'``.

    Returns
    -------
    ImageArrays
        The test images and labels (the hub's ``'test'`` split for CIFAR).
    """
    _check_choice("dataset", dataset, DATASETS)
    if dataset in _HUB_DATASETS:
        test = _hub_test_set(dataset)
    elif dataset == "synthetic":
        test = _synthetic_splits()[1]
    else:
        test = _npz_splits(data_path)[1]
    return test.subset(np.arange(len(test)))


def make_train_loader(
    arrays: ImageArrays,
    dataset: str,
    batch_size: int,
    *,
    augment: bool = True,
    seed: int = 0,
) -> DataLoader:
    """Wrap a training split into a shuffling, augmenting data loader.

    Parameters
    ----------
    arrays : ImageArrays
        The split to iterate over.
    dataset : str
        One of :data:`DATASETS`; selects the normalisation statistics.
    batch_size : int
        Samples per batch; the last batch may be smaller.
    augment : bool
        Apply a random 4-pixel-padded crop and a random horizontal flip.
    seed : int
        Seed of the shuffling order. The augmentations draw from torch's global
        random generator.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``(images, labels)`` with float32 NCHW images and int64 labels.
    """
    _check_choice("dataset", dataset, DATASETS)
    transform = _transform(dataset, arrays, augment=augment)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        _TransformedImages(arrays, transform),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=False,
        num_workers=0,
    )


def make_eval_loader(arrays: ImageArrays, dataset: str, batch_size: int) -> DataLoader:
    """Wrap an evaluation split into a sequential data loader.

    Parameters
    ----------
    arrays : ImageArrays
        The split to iterate over.
    dataset : str
        One of :data:`DATASETS`; selects the normalisation statistics.
    batch_size : int
        Samples per batch; the last batch may be smaller.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``(images, labels)`` with float32 NCHW images and int64 labels.
    """
    _check_choice("dataset", dataset, DATASETS)
    transform = _transform(dataset, arrays, augment=False)
    return DataLoader(
        _TransformedImages(arrays, transform), batch_size=batch_size, num_workers=0
    )


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
    """Return uint8 images in contiguous NCHW layout.

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


# ---------------------------------------------------------------- validation


def _check_choice(kind: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(
            f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}"
        )


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    """Raise ``ValueError`` unless ``0 <= partition_id < num_partitions``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id {partition_id} out of range for {num_partitions} partitions"
        )


# -------------------------------------------------------------- partitioning


def _make_partitioner(
    partitioner: str, num_partitions: int, label_column: str, alpha: float, seed: int
) -> Partitioner:
    """Build an (unassigned) flwr-datasets partitioner."""
    if partitioner == "iid":
        return IidPartitioner(num_partitions)
    return DirichletPartitioner(
        num_partitions,
        partition_by=label_column,
        alpha=alpha,
        min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
        seed=seed,
    )


def _index_partitioner(
    source: object,
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
) -> Partitioner:
    """Return a cached partitioner over the sample indices of an in-memory set.

    The partitioner works on a small ``(idx, label)`` dataset, shuffled with
    ``seed`` first because :class:`IidPartitioner` cuts contiguous shards.
    ``source`` identifies the data the labels belong to.
    """
    key = (source, num_partitions, partitioner, float(alpha), seed)
    if key not in _INDEX_PARTITIONERS:
        index = datasets.Dataset.from_dict(
            {"idx": np.arange(len(labels)), "label": labels}
        )
        split = _make_partitioner(partitioner, num_partitions, "label", alpha, seed)
        split.dataset = index.shuffle(seed=seed)
        _INDEX_PARTITIONERS[key] = split
    return _INDEX_PARTITIONERS[key]


def _local_train_set(dataset: str, data_path: str) -> tuple[ImageArrays, object]:
    """Return the training set of ``synthetic`` or ``npz`` and a key naming it."""
    if dataset == "synthetic":
        return _synthetic_splits()[0], "synthetic"
    path = _npz_path(data_path)
    return _npz_splits(path)[0], ("npz", path, os.stat(path).st_mtime_ns)


# ----------------------------------------------------------------- hub data


def _federated_dataset(
    dataset: str, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> FederatedDataset:
    """Return a cached, loaded :class:`FederatedDataset` for a hub dataset."""
    key = (dataset, num_partitions, partitioner, float(alpha), seed)
    if key not in _FEDERATED_DATASETS:
        spec = _HUB_DATASETS[dataset]
        fds = FederatedDataset(
            dataset=spec.hub_id,
            partitioners={
                "train": _make_partitioner(
                    partitioner, num_partitions, spec.label_column, alpha, seed
                )
            },
            seed=seed,
        )
        try:
            fds.load_split("train")  # downloads (or reads the cache) now
        except Exception as error:  # any hub, network or cache failure
            raise RuntimeError(_offline_message(dataset, spec)) from error
        _FEDERATED_DATASETS[key] = fds
    return _FEDERATED_DATASETS[key]


def _hub_test_set(dataset: str) -> ImageArrays:
    """Return the cached ``'test'`` split of a hub dataset."""
    if dataset not in _HUB_TEST_SETS:
        spec = _HUB_DATASETS[dataset]
        fds = _federated_dataset(dataset, 1, "iid", 0.5, 0)  # test is not split
        _HUB_TEST_SETS[dataset] = arrays_from_hf(
            fds.load_split("test"), spec.image_column, spec.label_column
        )
    return _HUB_TEST_SETS[dataset]


def _offline_message(dataset: str, spec: _HubSpec) -> str:
    """Explain a failed hub download and the offline alternatives."""
    return (
        f"could not load dataset {dataset!r} ({spec.hub_id}) from the Hugging Face "
        "hub; it needs network access or a populated Hugging Face cache. To run "
        "offline, set dataset='npz' with data-path='/abs/path/file.npz' (a NumPy "
        f"archive with keys {', '.join(NPZ_KEYS)}), or set dataset='synthetic'."
    )


# ---------------------------------------------------------------- npz files


def _npz_path(data_path: str) -> str:
    """Validate the ``npz`` data path and return it."""
    if not data_path or not os.path.isabs(data_path):
        raise ValueError(
            f"dataset='npz' needs an absolute data-path to a .npz file with keys "
            f"{', '.join(NPZ_KEYS)}; got {data_path!r}"
        )
    if not os.path.isfile(data_path):
        raise FileNotFoundError(
            f"npz file {data_path!r} not found; expected a NumPy archive with keys "
            f"{', '.join(NPZ_KEYS)}"
        )
    return data_path


def _npz_splits(data_path: str) -> tuple[ImageArrays, ImageArrays]:
    """Return the (cached) train and test splits of an ``npz`` file."""
    path = _npz_path(data_path)
    return _read_npz(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_npz(path: str, mtime_ns: int) -> tuple[ImageArrays, ImageArrays]:
    """Read and validate an ``npz`` file; ``mtime_ns`` invalidates the cache."""
    del mtime_ns  # only part of the cache key
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"npz file {path!r} lacks the keys {', '.join(missing)}; "
                f"expected {', '.join(NPZ_KEYS)}"
            )
        arrays = {key: archive[key] for key in NPZ_KEYS}
    return (
        _npz_split(path, "train", arrays["x_train"], arrays["y_train"]),
        _npz_split(path, "test", arrays["x_test"], arrays["y_test"]),
    )


def _npz_split(
    path: str, split: str, images: np.ndarray, labels: np.ndarray
) -> ImageArrays:
    """Validate one split of an ``npz`` file and convert it to :class:`ImageArrays`."""
    if images.dtype != np.uint8:
        raise ValueError(
            f"npz file {path!r}: x_{split} has dtype {images.dtype}; expected uint8 "
            "pixel values in 0..255"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"npz file {path!r}: y_{split} has dtype {labels.dtype}; expected integers"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(
            f"npz file {path!r}: x_{split} has {len(images)} images but y_{split} "
            f"has {len(labels)} labels"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"npz file {path!r}: y_{split} has negative labels")
    images = to_nchw(images)
    if images.shape[2] != images.shape[3]:
        raise ValueError(
            f"npz file {path!r}: x_{split} images are {images.shape[2]}x"
            f"{images.shape[3]}; expected square images"
        )
    return ImageArrays(images, labels)


# ------------------------------------------------------------ synthetic data


@functools.lru_cache(maxsize=1)
def _synthetic_splits() -> tuple[ImageArrays, ImageArrays]:
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


# ------------------------------------------------------------------ loaders


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


def _transform(dataset: str, arrays: ImageArrays, *, augment: bool) -> v2.Transform:
    """Build the per-sample transform: optional augmentation, scaling, normalisation."""
    channels, size = arrays.images.shape[1], arrays.images.shape[2]
    mean, std = _NORMALIZATION.get(
        dataset, ((_DEFAULT_MEAN_STD,) * channels, (_DEFAULT_MEAN_STD,) * channels)
    )
    augmentation = (
        [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if augment else []
    )
    return v2.Compose(
        [
            *augmentation,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
