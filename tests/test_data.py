"""Tests for :mod:`resist_fl.data` (offline: CIFAR is only tested failing)."""

from __future__ import annotations

from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resist_fl import data

SYNTHETIC_TRAIN = data.SYNTHETIC_TRAIN_SIZE


def image_keys(arrays: data.ImageArrays) -> list[bytes]:
    """Identify every image by its bytes (synthetic images are all distinct)."""
    return [image.tobytes() for image in arrays.images]


def synthetic_partitions(
    num_partitions: int, **kwargs: object
) -> list[data.ImageArrays]:
    return [
        data.load_partition("synthetic", pid, num_partitions, **kwargs)
        for pid in range(num_partitions)
    ]


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(name="nchw")
def fixture_nchw() -> dict[str, np.ndarray]:
    """A small RGB data set in NCHW layout with distinct images."""
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8),
        "y_train": np.arange(40) % 4,
        "x_test": rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8),
        "y_test": np.arange(12, dtype=np.int32) % 5,
    }


# ------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_with_expected_shapes() -> None:
    train = data.load_partition("synthetic", 0, 1, seed=123)
    test = data.load_test_set("synthetic")
    assert train.images.shape == (SYNTHETIC_TRAIN, 3, 32, 32)
    assert test.images.shape == (data.SYNTHETIC_TEST_SIZE, 3, 32, 32)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert set(train.labels.tolist()) == set(range(data.SYNTHETIC_NUM_CLASSES))
    data._synthetic_splits.cache_clear()
    regenerated = data.load_test_set("synthetic")
    np.testing.assert_array_equal(regenerated.images, test.images)
    np.testing.assert_array_equal(regenerated.labels, test.labels)
    assert len(set(image_keys(train)) | set(image_keys(test))) == len(train) + len(test)


def test_returned_arrays_are_copies() -> None:
    test = data.load_test_set("synthetic")
    test.images[:] = 0
    assert data.load_test_set("synthetic").images.any()


def test_dataset_info() -> None:
    assert data.dataset_info("cifar10") == data.DatasetInfo(10, 3, 32)
    assert data.dataset_info("cifar100") == data.DatasetInfo(100, 3, 32)
    assert data.dataset_info("synthetic") == data.DatasetInfo(10, 3, 32)


# --------------------------------------------------------------- partitioning


def test_iid_partitions_are_disjoint_cover_and_balanced() -> None:
    parts = synthetic_partitions(4, seed=7)
    keys = [key for part in parts for key in image_keys(part)]
    everything = data.load_partition("synthetic", 0, 1)
    assert len(keys) == len(set(keys)) == SYNTHETIC_TRAIN
    assert set(keys) == set(image_keys(everything))
    assert [len(part) for part in parts] == [SYNTHETIC_TRAIN // 4] * 4
    # Shuffled before sharding: every shard sees every class.
    assert all(
        len(np.unique(part.labels)) == data.SYNTHETIC_NUM_CLASSES for part in parts
    )


def test_dirichlet_partitions_cover_and_are_skewed() -> None:
    parts = synthetic_partitions(5, partitioner="dirichlet", alpha=0.1, seed=3)
    keys = [key for part in parts for key in image_keys(part)]
    assert len(keys) == len(set(keys)) == SYNTHETIC_TRAIN
    shares = np.stack(
        [np.bincount(p.labels, minlength=10) / len(p) for p in parts if len(p)]
    )
    assert shares.max() > 0.4  # an IID partition would hold ~10% of each class
    assert len({len(part) for part in parts}) > 1


def test_partitions_depend_on_seed_only() -> None:
    first = data.load_partition("synthetic", 1, 3, partitioner="dirichlet", seed=5)
    again = data.load_partition("synthetic", 1, 3, partitioner="dirichlet", seed=5)
    other = data.load_partition("synthetic", 1, 3, partitioner="dirichlet", seed=6)
    np.testing.assert_array_equal(first.images, again.images)
    assert image_keys(first) != image_keys(other)


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(-1, 2), (2, 2), (0, 0)])
def test_invalid_partition_ids(partition_id: int, num_partitions: int) -> None:
    with pytest.raises(ValueError, match="partition"):
        data.load_partition("synthetic", partition_id, num_partitions)


# ----------------------------------------------------------------------- npz


def test_npz_layouts_load_to_the_same_nchw(tmp_path: Path, nchw: dict) -> None:
    nhwc = {
        key: value.transpose(0, 2, 3, 1) if key.startswith("x") else value
        for key, value in nchw.items()
    }
    paths = [
        write_npz(tmp_path / "nchw.npz", **nchw),
        write_npz(tmp_path / "nhwc.npz", **nhwc),
    ]
    for path in paths:
        train = data.load_partition("npz", 0, 1, data_path=path)
        test = data.load_test_set("npz", data_path=path)
        assert sorted(image_keys(train)) == sorted(
            img.tobytes() for img in nchw["x_train"]
        )
        np.testing.assert_array_equal(test.images, nchw["x_test"])
        np.testing.assert_array_equal(test.labels, nchw["y_test"])
        assert test.labels.dtype == np.int64
        assert data.dataset_info("npz", path) == data.DatasetInfo(5, 3, 8)


def test_npz_grayscale_gets_a_channel(tmp_path: Path, nchw: dict) -> None:
    gray = {
        key: value[:, 0] if key.startswith("x") else value
        for key, value in nchw.items()
    }
    path = write_npz(tmp_path / "gray.npz", **gray)
    test = data.load_test_set("npz", data_path=path)
    np.testing.assert_array_equal(test.images, nchw["x_test"][:, :1])
    assert data.dataset_info("npz", path).in_channels == 1


def test_npz_partitions_cover_the_train_set(tmp_path: Path, nchw: dict) -> None:
    path = write_npz(tmp_path / "d.npz", **nchw)
    for partitioner in data.PARTITIONERS:
        parts = [
            data.load_partition("npz", pid, 3, partitioner=partitioner, data_path=path)
            for pid in range(3)
        ]
        keys = [key for part in parts for key in image_keys(part)]
        assert sorted(keys) == sorted(img.tobytes() for img in nchw["x_train"])


def test_npz_missing_file_names_path_and_keys(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz") as error:
        data.load_test_set("npz", data_path=path)
    assert "x_train" in str(error.value) and "y_test" in str(error.value)


def test_npz_needs_an_absolute_path() -> None:
    with pytest.raises(ValueError, match="absolute"):
        data.load_partition("npz", 0, 1, data_path="relative.npz")


def test_npz_missing_key(tmp_path: Path, nchw: dict) -> None:
    del nchw["y_test"]
    path = write_npz(tmp_path / "d.npz", **nchw)
    with pytest.raises(ValueError, match="y_test"):
        data.load_test_set("npz", data_path=path)


def test_npz_float_images(tmp_path: Path, nchw: dict) -> None:
    nchw["x_train"] = nchw["x_train"] / 255.0
    path = write_npz(tmp_path / "d.npz", **nchw)
    with pytest.raises(ValueError, match="float64"):
        data.load_partition("npz", 0, 1, data_path=path)


def test_npz_length_mismatch(tmp_path: Path, nchw: dict) -> None:
    nchw["y_train"] = nchw["y_train"][:-1]
    path = write_npz(tmp_path / "d.npz", **nchw)
    with pytest.raises(ValueError, match="39 labels"):
        data.load_partition("npz", 0, 1, data_path=path)


# -------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.dataset_info("mnist"),
        lambda: data.load_test_set("mnist"),
        lambda: data.load_partition("mnist", 0, 1),
        lambda: data.make_eval_loader(data.load_test_set("synthetic"), "mnist", 8),
    ],
)
def test_unknown_dataset(call) -> None:
    with pytest.raises(ValueError, match="'mnist'.*synthetic"):
        call()


def test_unknown_partitioner() -> None:
    with pytest.raises(ValueError, match="'pathological'.*dirichlet"):
        data.load_partition("synthetic", 0, 1, partitioner="pathological")


# ----------------------------------------------------------------- hub data


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_offline_error_explains_the_alternatives(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for call in (
        lambda: data.load_partition(dataset, 0, 2),
        lambda: data.load_test_set(dataset),
    ):
        with pytest.raises(RuntimeError) as error:
            call()
        message = str(error.value)
        assert repr(dataset) in message
        assert "npz" in message and "synthetic" in message and "x_train" in message


def test_arrays_from_hf_converts_pil_rows() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    rows = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pixels], "fine_label": [2, 0, 1]},
        features=datasets.Features(
            {"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=3)}
        ),
    )
    arrays = data.arrays_from_hf(rows, "img", "fine_label")
    np.testing.assert_array_equal(arrays.images, pixels.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(arrays.labels, [2, 0, 1])
    assert arrays.labels.dtype == np.int64


def test_arrays_from_hf_grayscale() -> None:
    pixels = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    rows = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": [1, 1]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int32")}
        ),
    )
    arrays = data.arrays_from_hf(rows, "image", "label")
    np.testing.assert_array_equal(arrays.images, pixels[:, None])


# ------------------------------------------------------------------- loaders


def test_image_arrays_validate_their_contents() -> None:
    with pytest.raises(ValueError, match="uint8"):
        data.ImageArrays(np.zeros((2, 3, 4, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="int64"):
        data.ImageArrays(np.zeros((2, 3, 4, 4), np.uint8), np.zeros(3, np.int64))


def test_eval_loader_normalises_with_dataset_statistics() -> None:
    arrays = data.ImageArrays(np.full((5, 3, 32, 32), 255, np.uint8), np.arange(5))
    images, labels = next(iter(data.make_eval_loader(arrays, "cifar10", 4)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3]
    expected = (1 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor(
        [0.2470, 0.2435, 0.2616]
    )
    torch.testing.assert_close(images[:, :, 0, 0], expected.expand(4, 3))
    black = data.ImageArrays(np.zeros((2, 1, 8, 8), np.uint8), np.zeros(2, np.int64))
    images, _ = next(iter(data.make_eval_loader(black, "npz", 8)))
    assert images.shape == (2, 1, 8, 8)
    torch.testing.assert_close(images, torch.full((2, 1, 8, 8), -1.0))


def test_train_loader_shuffles_by_seed_and_keeps_the_last_batch() -> None:
    arrays = data.load_partition("synthetic", 0, 20)  # 100 images

    def labels(seed: int) -> list[int]:
        loader = data.make_train_loader(
            arrays, "synthetic", 32, augment=False, seed=seed
        )
        return [label for _, batch in loader for label in batch.tolist()]

    assert sorted(labels(0)) == sorted(arrays.labels.tolist())
    assert labels(0) == labels(0) != labels(1)
    sizes = [len(batch) for _, batch in data.make_train_loader(arrays, "synthetic", 32)]
    assert sizes == [32, 32, 32, 4]


def test_train_loader_augments() -> None:
    arrays = data.load_test_set("synthetic")
    plain = data.make_train_loader(arrays, "synthetic", 64, augment=False, seed=0)
    augmented = data.make_train_loader(arrays, "synthetic", 64, augment=True, seed=0)
    torch.manual_seed(0)
    (x_plain, y_plain), (x_aug, y_aug) = next(iter(plain)), next(iter(augmented))
    assert x_aug.shape == x_plain.shape == (64, 3, 32, 32)
    assert torch.equal(y_plain, y_aug) and not torch.equal(x_plain, x_aug)
    assert abs(x_plain.mean().item()) < 0.2  # roughly centred by the 0.5/0.5 statistics


@pytest.fixture(name="one_thread")
def fixture_one_thread():
    """Run torch single-threaded: tiny models are slower with contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_synthetic_is_learnable_by_a_tiny_cnn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, data.SYNTHETIC_NUM_CLASSES),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = data.load_partition("synthetic", 0, 1)
    loader = data.make_train_loader(train, "synthetic", 32, augment=False, seed=0)
    steps = 0
    while steps < 150:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 150:
                break
    correct = 0
    test = data.load_test_set("synthetic")
    with torch.no_grad():
        for images, labels in data.make_eval_loader(test, "synthetic", 250):
            correct += (model(images).argmax(1) == labels).sum().item()
    assert correct / len(test) > 0.5
