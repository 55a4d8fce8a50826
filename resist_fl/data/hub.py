"""CIFAR-10 and CIFAR-100 from the Hugging Face hub, through flwr-datasets.

Loading needs network access or a populated Hugging Face cache; without
either, a :class:`~resist_fl.data.arrays.DataError` says what to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from resist_fl.data.arrays import DataError, ImageArrays, arrays_from_hf
from resist_fl.data.npz import NPZ_KEYS

if TYPE_CHECKING:  # flwr-datasets (and the Hugging Face stack) is imported only when a hub set is used
    import datasets
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import Partitioner

CIFAR_IMAGE_SIZE = 32
CIFAR_CHANNELS = 3


@dataclass(frozen=True)
class HubSpec:
    """Where a hub dataset lives and how its columns are named."""

    hub_id: str
    image_column: str
    label_column: str
    num_classes: int


HUB_DATASETS = {
    "cifar10": HubSpec("uoft-cs/cifar10", "img", "label", 10),
    "cifar100": HubSpec("uoft-cs/cifar100", "img", "fine_label", 100),
}

# Per-process caches, keyed by everything that determines their contents.
_FEDERATED_DATASETS: dict[tuple[object, ...], FederatedDataset] = {}
_TEST_SETS: dict[str, ImageArrays] = {}
_TRAIN_LABELS: dict[str, np.ndarray] = {}


def hub_partition(dataset: str, partition_id: int, partitioner: Partitioner, key: tuple, seed: int) -> ImageArrays:
    """One partition of a hub dataset's training split; ``key`` names ``partitioner``'s settings."""
    spec = HUB_DATASETS[dataset]
    fds = _federated_dataset(dataset, partitioner, key, seed)
    return arrays_from_hf(fds.load_partition(partition_id, "train"), spec.image_column, spec.label_column)


def hub_test_set(dataset: str) -> ImageArrays:
    """The cached ``'test'`` split of a hub dataset."""
    if dataset not in _TEST_SETS:
        from flwr_datasets.partitioner import IidPartitioner

        spec = HUB_DATASETS[dataset]
        fds = _federated_dataset(dataset, IidPartitioner(1), ("iid", 1), 0)  # test is not split
        _TEST_SETS[dataset] = arrays_from_hf(fds.load_split("test"), spec.image_column, spec.label_column)
    return _TEST_SETS[dataset]


def hub_train_split(dataset: str) -> datasets.Dataset:
    """The whole ``'train'`` split of a hub dataset, in a fixed order (flwr-datasets' shuffle with seed 0),
    images not yet decoded."""
    from flwr_datasets.partitioner import IidPartitioner

    return _federated_dataset(dataset, IidPartitioner(1), ("iid", 1), 0).load_split("train")


def hub_train_labels(dataset: str) -> np.ndarray:
    """The labels of :func:`hub_train_split`, in its order (no image decoded; read once per process)."""
    if dataset not in _TRAIN_LABELS:
        labels = np.asarray(hub_train_split(dataset)[HUB_DATASETS[dataset].label_column], dtype=np.int64)
        labels.setflags(write=False)
        _TRAIN_LABELS[dataset] = labels
    return _TRAIN_LABELS[dataset]


def hub_train_images(dataset: str, indices: np.ndarray) -> ImageArrays:
    """The images of :func:`hub_train_split` at ``indices``, decoded."""
    spec = HUB_DATASETS[dataset]
    return arrays_from_hf(hub_train_split(dataset).select(indices), spec.image_column, spec.label_column)


def _federated_dataset(dataset: str, partitioner: Partitioner, key: tuple, seed: int) -> FederatedDataset:
    """A cached, loaded :class:`FederatedDataset` for a hub dataset."""
    cache_key = (dataset, key, seed)
    if cache_key not in _FEDERATED_DATASETS:
        from flwr_datasets import FederatedDataset

        spec = HUB_DATASETS[dataset]
        fds = FederatedDataset(dataset=spec.hub_id, partitioners={"train": partitioner}, seed=seed)
        try:
            fds.load_split("train")  # downloads (or reads the cache) now
        except Exception as error:  # any hub, network or cache failure
            raise DataError(offline_message(dataset, error)) from error
        _FEDERATED_DATASETS[cache_key] = fds
    return _FEDERATED_DATASETS[cache_key]


def offline_message(dataset: str, error: BaseException) -> str:
    """Explain a failed hub download and the offline alternatives."""
    spec = HUB_DATASETS[dataset]
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"could not load dataset {dataset!r} ({spec.hub_id}) from the Hugging Face hub "
        f"({type(error).__name__}: {reason[:200]}). It needs network access or a populated "
        "Hugging Face cache. To run offline: dataset='digits' (scikit-learn's real 8x8 digits, the "
        "default job), dataset='fashion-mnist' or 'mnist' with the original IDX files (data-path, or Debian's "
        "dataset-fashion-mnist package), dataset='npz' with data-path='/abs/path/file.npz' (a NumPy archive with "
        f"keys {', '.join(NPZ_KEYS)}), or dataset='synthetic'."
    )
