"""``validation-size``: training images held out as the validation set, never trained on, the same for every
seed and node, on every data path (in-memory sets and the hub's); the run then evaluates on them, not the test set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.data import DataError, load_partition, load_test_set, normalization
from resist_fl.data.arrays import ImageArrays
from resist_fl.data.partitioning import partition_label_counts
from resist_fl.data.sources import held_out, image_statistics, local_train_set
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess
from simulations.label_plot import partitioner_of


def rows(arrays: ImageArrays) -> list[bytes]:
    """Every image with its label as bytes, sorted: a multiset comparable across orders."""
    return sorted(image.tobytes() + bytes([int(label)]) for image, label in zip(arrays.images, arrays.labels))


def concatenated(parts: list[ImageArrays]) -> ImageArrays:
    return ImageArrays(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


@pytest.mark.parametrize("size", [10, 97, 500])
def test_held_out_is_a_fixed_draw_stratified_by_label(size):
    """Every label keeps its share of the hold-out to within one image (skewed labels: 1 .. 4 in 10)."""
    labels = np.random.default_rng(5).choice(10, 1000, p=np.arange(1, 11) / 55)
    first = held_out(labels, size)
    assert np.array_equal(first, held_out(labels, size)) and len(set(first)) == size and first.max() < 1000
    assert np.all(np.diff(first) > 0)  # sorted
    share = np.bincount(labels, minlength=10) * size / len(labels)
    assert np.all(np.abs(np.bincount(labels[first], minlength=10) - share) <= 1)


def test_too_small_or_too_large_a_hold_out_is_refused():
    labels = np.arange(1000) % 10
    with pytest.raises(DataError, match=r"validation-size = 501: expected 10 \.\. 500 \(at least one image per"):
        held_out(labels, 501)
    with pytest.raises(DataError, match=r"validation-size = 9: expected 10 \.\. 500"):
        held_out(labels, 9)
    with pytest.raises(DataError, match=r"validation-size = 5000: expected 10 \.\. 718"):
        load_test_set("digits", validation_size=5000)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_partitions_and_the_validation_set_split_the_training_set_whatever_the_seed(seed):
    """Real digits: every seed's Dirichlet partitions hold exactly the training images not held out; the
    validation set is the held-out ones, whatever the seed."""
    whole, _ = local_train_set("digits", "")
    validation = load_test_set("digits", validation_size=300)
    assert rows(validation) == rows(whole.subset(held_out(whole.labels, 300)))
    parts = [load_partition("digits", i, 5, partitioner="dirichlet", alpha=0.5, seed=seed, validation_size=300)
             for i in range(5)]
    assert rows(concatenated([*parts, validation])) == rows(whole)  # nothing lost, nothing trained twice
    counts = partition_label_counts("digits", 5, 10, partitioner="dirichlet", alpha=0.5, seed=seed, validation_size=300)
    assert np.array_equal(counts, [np.bincount(p.labels, minlength=10) for p in parts])
    plotted = {"dataset": "digits", "partitioner": "dirichlet", "seed": seed, "validation-size": 300}
    drawn, _ = partitioner_of(plotted, 5)
    assert [drawn.load_partition(i).num_rows for i in range(5)] == [len(p) for p in parts]  # the report's plot
    kept = local_train_set("digits", "", validation_size=300)[0]
    assert normalization("digits", validation_size=300) == image_statistics(kept.images)


def test_the_hub_path_holds_out_the_same_way(monkeypatch):
    """CIFAR from the hub (faked: no network here): the partitions, cut by index from the kept images, and the
    validation set split the hub's training split."""
    import datasets

    from resist_fl.data import hub

    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(60)]
    train = datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(60)]},
                                       features=datasets.Features({"img": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))

    class FakeFederatedDataset:
        def load_split(self, split):
            assert split == "train"  # the test split is never read with a hold-out
            return train

    monkeypatch.setattr(hub, "_federated_dataset", lambda *args: FakeFederatedDataset())
    whole = hub.arrays_from_hf(train, "img", "label")
    validation = load_test_set("cifar10", validation_size=12)
    assert rows(validation) == rows(whole.subset(held_out(whole.labels, 12)))
    parts = [load_partition("cifar10", i, 3, partitioner="iid", seed=4, validation_size=12) for i in range(3)]
    assert [len(p) for p in parts] == [16, 16, 16]
    assert rows(concatenated([*parts, validation])) == rows(whole)
    drawn, _ = partitioner_of({"dataset": "cifar10", "partitioner": "iid", "seed": 4, "validation-size": 12}, 3)
    assert [drawn.load_partition(i).num_rows for i in range(3)] == [16, 16, 16]
    counts = partition_label_counts("cifar10", 3, 10, partitioner="iid", seed=4, validation_size=12)
    assert np.array_equal(counts, [np.bincount(p.labels, minlength=10) for p in parts])


def test_a_run_with_a_hold_out_evaluates_on_it_and_says_so(tiny_config):
    """In-process: every evaluation (central and per client) is on the held-out images, which run_config.json
    records; without a hold-out, the test set."""
    tiny_config.update({"validation-size": 300, "num-server-rounds": 2, "local-steps": 1, "client-eval": True})
    run_inprocess(tiny_config, num_nodes=2)
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    data = json.loads((run_dir / "run_config.json").read_text())["data"]
    assert data["validation-size"] == 300 and data["test-size"] == 300
    assert [r["eval-images"] for r in read_metrics(run_dir)] == [300, 300]
    assert 0 <= read_metrics(run_dir)[-1]["client-accuracy-mean"] <= 1


def test_an_image_folder_hold_out_is_cropped_as_its_evaluation_split_is(tmp_path):
    """ImageFolder training images are kept at the resize size (for random crops); held out, they are
    centre-cropped to the evaluation size, as the val/ images are."""
    from torchvision.transforms import v2

    from resist_fl.data.imagefolder import imagefolder_splits, resize_size
    from tests.data.test_imagenet import make_image_folder

    folder = str(make_image_folder(tmp_path / "images"))
    train, val = imagefolder_splits(folder, image_size=32)
    held = load_test_set("imagefolder", folder, 32, validation_size=6)
    assert held.images.shape == (6, 3, 32, 32) == (6, *val.images.shape[1:])
    chosen = held_out(train.labels, 6)
    expected = v2.CenterCrop(32)(torch.from_numpy(train.images[chosen]))
    np.testing.assert_array_equal(held.images, expected.numpy())
    assert resize_size(32) == train.images.shape[-1] != 32
    assert len(local_train_set("imagefolder", folder, 32, validation_size=6)[0]) == len(train) - 6


def test_a_node_with_its_own_data_path_refuses_a_hold_out():
    """The hold-out is drawn from the run's data set; a node reading its own file would hold out other images."""
    from flwr.app import Context, RecordDict

    from client_app.app import _data_path
    from resist_fl.run.settings import RunSettings

    own = Context(run_id=1, node_id=1, node_config={"data-path": "/data/site.npz"}, state=RecordDict(), run_config={})
    with pytest.raises(DataError, match=r"validation-size = 50 with this node's own data-path '/data/site.npz'"):
        _data_path(own, RunSettings(validation_size=50))
    assert _data_path(own, RunSettings()) == "/data/site.npz"
