"""Federated partitions of a training set, by flwr-datasets' partitioners."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.hub import HUB_DATASETS, hub_partition
from resist_fl.data.sources import DATASETS, check_choice, local_train_set

if TYPE_CHECKING:  # flwr-datasets and the Hugging Face stack are imported when a partition is split
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet")

DIRICHLET_MIN_PARTITION_SIZE = 1
"""Smallest Dirichlet partition; resampled until every client has data."""

_INDEX_PARTITIONERS: dict[tuple[object, ...], Partitioner] = {}


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    data_path: str = "",
    image_size: int = 224,
) -> ImageArrays:
    """Load one federated partition of a training set.

    Parameters
    ----------
    dataset : str
        One of :data:`~resist_fl.data.sources.DATASETS`.
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
        Absolute path of the ``.npz`` file or the image directory (``npz``, ``imagefolder``).
    image_size : int
        The crop size of ``imagefolder`` images.

    Returns
    -------
    ImageArrays
        The partition's images and labels.

    Raises
    ------
    ValueError
        For an unknown dataset or partitioner, or an invalid partition id.
    DataError
        When the data set cannot be loaded (a malformed file, or offline).
    """
    check_choice("dataset", dataset, DATASETS)
    check_choice("partitioner", partitioner, PARTITIONERS)
    _check_partition_id(partition_id, num_partitions)
    if dataset in HUB_DATASETS:
        spec = HUB_DATASETS[dataset]
        split = make_partitioner(partitioner, num_partitions, spec.label_column, alpha, seed)
        return hub_partition(dataset, partition_id, split, (partitioner, num_partitions, float(alpha)), seed)
    train, source = local_train_set(dataset, data_path, image_size)
    split = _index_partitioner(source, train.labels, num_partitions, partitioner, alpha, seed)
    indices = split.load_partition(partition_id).with_format("numpy")[:]["idx"]
    return train.subset(indices)


def make_partitioner(
    partitioner: str, num_partitions: int, label_column: str, alpha: float, seed: int
) -> Partitioner:
    """Build an (unassigned) flwr-datasets partitioner."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if partitioner == "iid":
        return IidPartitioner(num_partitions)
    return DirichletPartitioner(
        num_partitions,
        partition_by=label_column,
        alpha=alpha,
        min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
        seed=seed,
    )


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    """Raise ``ValueError`` unless ``0 <= partition_id < num_partitions``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id {partition_id} out of range for {num_partitions} partitions"
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
        import datasets

        index = datasets.Dataset.from_dict(
            {"idx": np.arange(len(labels)), "label": labels}
        )
        split = make_partitioner(partitioner, num_partitions, "label", alpha, seed)
        split.dataset = index.shuffle(seed=seed)
        _INDEX_PARTITIONERS[key] = split
    return _INDEX_PARTITIONERS[key]
