"""The per-partition label distribution of a run's partitioning, drawn by flwr-datasets.

The runner writes ``label_distribution.png`` into every run directory it launches (it knows the
number of partitions: one per SuperNode); the report shows it. The partitioner is the one the
ClientApps use (:func:`resist_fl.data.partitioning.make_partitioner` over the same labels and
seed), so the plot is the partitioning the run trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resist_fl.data.arrays import DataError
from simulations.markdown import pyplot

LABEL_PLOT = "label_distribution.png"


def partitioner_of(run_config: Mapping[str, Any], num_partitions: int):
    """The run's flwr-datasets partitioner with its data assigned, and its label column."""
    from resist_fl.data.hub import HUB_DATASETS, _federated_dataset
    from resist_fl.data.partitioning import hub_kept_split, local_split, make_partitioner

    dataset, seed = str(run_config["dataset"]), int(run_config.get("seed", 0))
    name, alpha = str(run_config.get("partitioner", "iid")), float(run_config.get("dirichlet-alpha", 0.5))
    shards = int(run_config.get("shards-per-partition", 2))
    validation = int(run_config.get("validation-size", 0))
    if dataset in HUB_DATASETS and validation:
        return hub_kept_split(dataset, validation, num_partitions, name, alpha, seed, shards)[0], "label"
    if dataset in HUB_DATASETS:
        spec = HUB_DATASETS[dataset]
        split = make_partitioner(name, num_partitions, spec.label_column, alpha, seed, shards)
        fds = _federated_dataset(dataset, split, (name, num_partitions, alpha, shards), seed)
        return fds.partitioners["train"], spec.label_column
    return local_split(dataset, num_partitions, name, alpha, seed, str(run_config.get("data-path", "")),
                       int(run_config.get("image-size", 224)), shards, validation)[1], "label"


def write_label_distribution(run_config: Mapping[str, Any], num_partitions: int, path: Path) -> Path | None:
    """Draw the partitions' label counts to ``path``; None (with the reason printed) when the
    data cannot be read here (e.g. the hub offline): the run itself is not affected."""
    plt = pyplot()  # before flwr-datasets imports it
    from flwr_datasets.visualization import plot_label_distributions

    try:
        partitioner, label = partitioner_of(run_config, num_partitions)
    except (DataError, OSError, ValueError) as err:
        print(f"label distribution not drawn for {path.parent.name}: {err}", flush=True)
        return None
    figure, _, _ = plot_label_distributions(
        partitioner, label, plot_type="bar", size_unit="absolute", legend=True, verbose_labels=False,
        title=f"{run_config.get('partitioner', 'iid')} partitioning of {run_config['dataset']}: labels per partition")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
