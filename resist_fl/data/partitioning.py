"""Federated partitions of a training set, by flwr-datasets' partitioners."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from resist_fl.data.arrays import DataError, ImageArrays
from resist_fl.data.hub import HUB_DATASETS, hub_partition, hub_train_images, hub_train_labels
from resist_fl.data.sources import DATASETS, check_choice, kept, local_train_set

if TYPE_CHECKING:  # flwr-datasets and the Hugging Face stack are imported when a partition is split
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet", "shard", "linear", "square", "exponential")
"""flwr-datasets partitioners: ``iid`` (equal random shards), ``dirichlet`` (label skew by a
Dirichlet draw per label), ``shard`` (pathological non-IID, as in FedAvg's and the sub-model
papers: the set sorted by label, cut into ``num_partitions * shards_per_partition`` equal shards,
each partition a few shards, so a few labels), ``linear`` / ``square`` / ``exponential`` (IID
labels, partition i's size in proportion to i + 1, (i + 1)^2, e^(i + 1))."""

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
    shards_per_partition: int = 2,
    validation_size: int = 0,
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
        One of :data:`PARTITIONERS`.
    alpha : float
        Dirichlet concentration; smaller is more skewed. Only for ``'dirichlet'``.
    seed : int
        Seed of the shuffling and of the Dirichlet sampling.
    data_path : str
        Absolute path of the ``.npz`` file or the image directory (``npz``, ``imagefolder``).
    image_size : int
        The crop size of ``imagefolder`` images.
    shards_per_partition : int
        Shards (of one label each, mostly) per partition. Only for ``'shard'``.
    validation_size : int
        Training images held out of every partition as the validation set
        (:func:`~resist_fl.data.sources.held_out`); 0: none.

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
    if dataset in HUB_DATASETS and validation_size:  # the split of the kept images, by index
        split, rest = hub_kept_split(dataset, validation_size, num_partitions, partitioner, alpha, seed,
                                     shards_per_partition)
        chosen = rest[split_indices(split, partition_id, num_partitions)]
        return hub_train_images(dataset, chosen)
    if dataset in HUB_DATASETS:
        spec = HUB_DATASETS[dataset]
        split = make_partitioner(partitioner, num_partitions, spec.label_column, alpha, seed, shards_per_partition)
        key = (partitioner, num_partitions, float(alpha), shards_per_partition)
        return hub_partition(dataset, partition_id, split, key, seed)
    train, split = local_split(dataset, num_partitions, partitioner, alpha, seed, data_path, image_size,
                               shards_per_partition, validation_size)
    return train.subset(split_indices(split, partition_id, num_partitions))


def local_split(dataset: str, num_partitions: int, partitioner: str, alpha: float, seed: int, data_path: str,
                image_size: int, shards_per_partition: int,
                validation_size: int = 0) -> tuple[ImageArrays, Partitioner]:
    """A local training set and its (cached) split over sample indices: what :func:`load_partition` cuts."""
    train, source = local_train_set(dataset, data_path, image_size, validation_size)
    return train, index_partitioner(source, train.labels, num_partitions, partitioner, alpha, seed,
                                    shards_per_partition)


def hub_kept_split(dataset: str, validation_size: int, num_partitions: int, partitioner: str, alpha: float,
                   seed: int, shards_per_partition: int) -> tuple[Partitioner, np.ndarray]:
    """A hub training split less its held-out images: the (cached) split over the kept images' positions, and
    those positions in the hub's split (:func:`~resist_fl.data.hub.hub_train_split`)."""
    labels = hub_train_labels(dataset)
    rest = kept(labels, validation_size)
    return index_partitioner((dataset, "validation", validation_size), labels[rest], num_partitions, partitioner,
                             alpha, seed, shards_per_partition), rest


def partition_label_counts(dataset: str, num_partitions: int, num_classes: int, **partitioning: object) -> np.ndarray:
    """Training images of each label in every partition, a ``(num_partitions, num_classes)`` int64 array.

    ``partitioning`` are :func:`load_partition`'s keyword arguments (the same split the nodes
    load, so the same partitioner, alpha, seed and data).
    """
    counts = np.zeros((num_partitions, num_classes), dtype=np.int64)
    split = None
    if dataset in DATASETS and dataset not in HUB_DATASETS:  # a local set: its labels by index, no image copied
        options = {"partitioner": "iid", "alpha": 0.5, "seed": 0, "data_path": "", "image_size": 224,
                   "shards_per_partition": 2, "validation_size": 0, **partitioning}
        check_choice("partitioner", str(options["partitioner"]), PARTITIONERS)
        train, split = local_split(dataset, num_partitions, **options)
        all_labels = np.asarray(train.labels, dtype=np.int64)
    elif dataset in HUB_DATASETS and partitioning.get("validation_size"):  # the kept images' labels by index
        options = {"partitioner": "iid", "alpha": 0.5, "seed": 0, "shards_per_partition": 2, **partitioning}
        check_choice("partitioner", str(options["partitioner"]), PARTITIONERS)
        split, rest = hub_kept_split(dataset, int(options["validation_size"]), num_partitions,
                                     str(options["partitioner"]), float(options["alpha"]), int(options["seed"]),
                                     int(options["shards_per_partition"]))
        all_labels = hub_train_labels(dataset)[rest]
    for pid in range(num_partitions):
        if split is not None:
            labels = all_labels[split_indices(split, pid, num_partitions)]
        else:
            labels = np.asarray(load_partition(dataset, pid, num_partitions, **partitioning).labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"partition {pid} has labels outside [0, {num_classes})")
        counts[pid] = np.bincount(labels, minlength=num_classes)
    return counts


def make_partitioner(
    partitioner: str, num_partitions: int, label_column: str, alpha: float, seed: int, shards_per_partition: int = 2
) -> Partitioner:
    """Build an (unassigned) flwr-datasets partitioner."""
    from flwr_datasets import partitioner as fp

    if partitioner == "iid":
        return fp.IidPartitioner(num_partitions)
    if partitioner == "shard":
        return fp.ShardPartitioner(num_partitions, partition_by=label_column,
                                   num_shards_per_partition=shards_per_partition, shuffle=True, seed=seed)
    sized = {"linear": fp.LinearPartitioner, "square": fp.SquarePartitioner, "exponential": fp.ExponentialPartitioner}
    if partitioner in sized:
        return sized[partitioner](num_partitions)
    return fp.DirichletPartitioner(
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


def split_indices(split: Partitioner, partition_id: int, num_partitions: int) -> np.ndarray:
    """The sample indices of partition ``partition_id`` of an index partitioner over ``num_partitions``; a
    partitioner that cannot cut its data so (too many partitions for a size-weighted or Dirichlet split) is a
    DataError naming it."""
    try:
        return split.load_partition(partition_id).with_format("numpy")[:]["idx"]
    except (IndexError, ZeroDivisionError, ValueError) as err:
        raise DataError(f"num-partitions = {num_partitions}: the {type(split).__name__} cannot cut that many "
                        f"partitions from the {split.dataset.num_rows} training images ({err}); expected fewer "
                        "partitions") from err


def index_partitioner(
    source: object,
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
    shards_per_partition: int = 2,
) -> Partitioner:
    """Return a cached partitioner over the sample indices of an in-memory set.

    The partitioner works on a small ``(idx, label)`` dataset, shuffled with
    ``seed`` first because :class:`IidPartitioner` cuts contiguous shards.
    ``source`` identifies the data the labels belong to.
    """
    key = (source, num_partitions, partitioner, float(alpha), seed, shards_per_partition)
    if num_partitions > len(labels):
        raise DataError(f"num-partitions = {num_partitions}: more partitions than the {len(labels)} training images; "
                        f"expected at most {len(labels)}")
    if partitioner == "shard" and num_partitions * shards_per_partition > len(labels):
        raise DataError(f"shards-per-partition = {shards_per_partition} with num-partitions = {num_partitions}: more "
                        f"shards than the {len(labels)} training images; expected at most "
                        f"{len(labels) // num_partitions} shards per partition")
    if key not in _INDEX_PARTITIONERS:
        import datasets

        index = datasets.Dataset.from_dict(
            {"idx": np.arange(len(labels)), "label": labels}
        )
        split = make_partitioner(partitioner, num_partitions, "label", alpha, seed, shards_per_partition)
        split.dataset = index.shuffle(seed=seed)
        _INDEX_PARTITIONERS[key] = split
    return _INDEX_PARTITIONERS[key]
