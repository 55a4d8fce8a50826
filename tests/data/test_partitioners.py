"""flwr-datasets' shard and size partitioners as `partitioner` values, and the label plot."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from resist_fl.data import DataError, load_partition
from resist_fl.data.synthetic import SYNTHETIC_TRAIN_SIZE
from simulations.label_plot import write_label_distribution


def partitions(name: str, count: int = 4, **kwargs) -> list:
    return [load_partition("synthetic", i, count, partitioner=name, seed=3, **kwargs) for i in range(count)]


@pytest.mark.parametrize("shards", [1, 2])
def test_shard_partitions_hold_a_few_labels_each(shards):
    parts = partitions("shard", shards_per_partition=shards)
    shard_size = SYNTHETIC_TRAIN_SIZE // (4 * shards)
    assert [len(p) for p in parts] == [shards * shard_size] * 4
    smallest_label = min(np.bincount(np.concatenate([p.labels for p in partitions("iid")])))
    most = shards * (-(-shard_size // smallest_label) + 1)  # a shard: a run of the label-sorted set
    for part in parts:
        assert len(set(part.labels.tolist())) <= most
    iid = partitions("iid")
    assert min(len(set(p.labels.tolist())) for p in iid) == 10 > max(len(set(p.labels.tolist())) for p in parts)
    assert partitions("shard", shards_per_partition=shards)[0].labels.tolist() == parts[0].labels.tolist()


@pytest.mark.parametrize("name, weights", [
    ("linear", [1, 2, 3, 4]), ("square", [1, 4, 9, 16]), ("exponential", list(np.exp([1, 2, 3, 4])))])
def test_size_partitioners_give_sizes_in_proportion(name, weights):
    sizes = [len(p) for p in partitions(name)]
    expected = np.array(weights) / sum(weights) * SYNTHETIC_TRAIN_SIZE
    assert sum(sizes) <= SYNTHETIC_TRAIN_SIZE and np.all(np.abs(np.array(sizes) - expected) <= 4)
    assert sizes == sorted(sizes)




def test_label_distribution_plot_is_drawn_from_the_runs_partitioner(tmp_path):
    path = write_label_distribution({"dataset": "synthetic", "partitioner": "shard", "shards-per-partition": 2,
                                     "seed": 3}, 4, tmp_path / "run" / "label_distribution.png")
    assert path is not None and path.stat().st_size > 5000
    assert write_label_distribution({"dataset": "npz", "data-path": str(tmp_path / "missing.npz")}, 2,
                                    tmp_path / "other" / "label_distribution.png") is None


def test_nodes_train_on_shard_partitions(tiny_config):
    from pathlib import Path

    from resist_fl.run.outputs import read_metrics
    from simulations.inprocess import run_inprocess

    config = {**tiny_config, "partitioner": "shard", "shards-per-partition": 1, "num-server-rounds": 1}
    run_inprocess(config, num_nodes=2)
    nodes = read_metrics(Path(config["output-dir"]) / "test", "nodes.jsonl")
    assert [n["status"] for n in nodes] == ["accepted", "accepted"]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shard"])
def test_label_counts_equal_the_labels_of_every_loaded_partition(partitioner):
    """The server's label counts (client-eval) come from the split's indices, with no image copied: they
    equal the labels of the partitions the nodes load."""
    from resist_fl.data.partitioning import partition_label_counts

    options = {"partitioner": partitioner, "alpha": 0.3, "seed": 3, "shards_per_partition": 2}
    counts = partition_label_counts("digits", 7, 10, **options)
    expected = [np.bincount(load_partition("digits", p, 7, **options).labels, minlength=10) for p in range(7)]
    assert counts.tolist() == np.array(expected).tolist()


@pytest.mark.parametrize("partitioner, partitions, extra, message", [
    ("iid", 1500, {}, "num-partitions = 1500: more partitions than the 1437 training images"),
    ("shard", 2, {"shards_per_partition": 1000}, "shards-per-partition = 1000 with num-partitions = 2: more shards"),
    ("exponential", 30, {}, "num-partitions = 30: the ExponentialPartitioner cannot cut that many partitions"),
    ("dirichlet", 300, {}, "num-partitions = 300: the DirichletPartitioner cannot cut that many partitions"),
])
def test_a_split_the_data_cannot_give_is_a_data_error_naming_the_setting(partitioner, partitions, extra, message):
    """(Were an IndexError, a ZeroDivisionError and flwr-datasets' own errors naming no setting.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns at each Dirichlet attempt
        with pytest.raises(DataError, match=re.escape(message)):
            load_partition("digits", 0, partitions, partitioner=partitioner, **extra)
