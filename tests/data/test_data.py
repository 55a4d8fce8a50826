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
from resist_fl.data.synthetic import synthetic_splits

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
    synthetic_splits.cache_clear()
    regenerated = data.load_test_set("synthetic")
    np.testing.assert_array_equal(regenerated.images, test.images)
    np.testing.assert_array_equal(regenerated.labels, test.labels)
    assert len(set(image_keys(train)) | set(image_keys(test))) == len(train) + len(test)


def test_returned_arrays_are_copies() -> None:
    test = data.load_test_set("synthetic")
    test.images[:] = 0
    assert data.load_test_set("synthetic").images.any()


def test_dataset_info() -> None:
    assert data.dataset_info("cifar10") == data.DatasetInfo(10, 3, (32, 32))
    assert data.dataset_info("cifar100") == data.DatasetInfo(100, 3, (32, 32))
    assert data.dataset_info("synthetic") == data.DatasetInfo(10, 3, (32, 32))


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
        assert data.dataset_info("npz", path) == data.DatasetInfo(5, 3, (8, 8))


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
        every = sorted(img.tobytes() for img in nchw["x_train"])
        if partitioner in ("iid", "dirichlet"):
            assert sorted(keys) == every
        else:  # shard and size partitioners may leave a remainder out, never share an image
            assert len(set(keys)) == len(keys) and set(keys) <= set(every) and len(keys) >= len(every) // 2


def test_npz_missing_file_names_path_and_keys(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.npz")
    with pytest.raises(data.DataError, match="absent.npz") as error:
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
    nchw["x_train"] = nchw["x_train"].astype(np.float32)  # numbers in [0, 255] are pixels
    path = write_npz(tmp_path / "d.npz", **nchw)
    train = data.load_partition("npz", 0, 1, data_path=path)
    assert train.images.dtype == np.uint8
    assert sorted(image_keys(train)) == sorted(img.astype(np.uint8).tobytes() for img in nchw["x_train"])


def test_npz_length_mismatch(tmp_path: Path, nchw: dict) -> None:
    nchw["y_train"] = nchw["y_train"][:-1]
    path = write_npz(tmp_path / "d.npz", **nchw)
    with pytest.raises(ValueError, match="39 labels"):
        data.load_partition("npz", 0, 1, data_path=path)


# -------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.dataset_info("svhn"),
        lambda: data.load_test_set("svhn"),
        lambda: data.load_partition("svhn", 0, 1),
    ],
)
def test_unknown_dataset(call) -> None:
    with pytest.raises(ValueError, match="'svhn'.*synthetic"):
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
        with pytest.raises(data.DataError) as error:
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
    loader = data.EvalBatches(arrays, 4, normalization=data.normalization("cifar10"))
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3]
    expected = (1 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor(
        [0.2470, 0.2435, 0.2616]
    )
    torch.testing.assert_close(images[:, :, 0, 0], expected.expand(4, 3))


def test_train_loader_shuffles_by_seed_and_keeps_the_last_batch() -> None:
    arrays = data.load_partition("synthetic", 0, 20)  # 100 images
    stats = data.normalization("synthetic")

    def labels(seed: int) -> list[int]:
        loader = data.TrainBatches(arrays, 32, normalization=stats, seed=seed)
        return [label for _, batch in loader for label in batch.tolist()]

    assert sorted(labels(0)) == sorted(arrays.labels.tolist())
    assert labels(0) == labels(0) != labels(1)
    sizes = [len(batch) for _, batch in data.TrainBatches(arrays, 32, normalization=stats)]
    assert sizes == [32, 32, 32, 4]
    # never a last batch of one image: BatchNorm cannot train on it (a Dirichlet partition of 33)
    sizes = [len(batch) for _, batch in data.TrainBatches(arrays.subset(np.arange(33)), 32,
                                                               normalization=stats)]
    assert sizes == [32]


def test_train_loader_augments() -> None:
    arrays = data.load_test_set("synthetic")
    stats = data.normalization("synthetic")
    plain = data.TrainBatches(arrays, 64, normalization=stats, augment="none", seed=0)
    augmented = data.TrainBatches(arrays, 64, normalization=stats, augment="crop-flip", seed=0)
    torch.manual_seed(0)
    (x_plain, y_plain), (x_aug, y_aug) = next(iter(plain)), next(iter(augmented))
    assert x_aug.shape == x_plain.shape == (64, 3, 32, 32)
    assert torch.equal(y_plain, y_aug) and not torch.equal(x_plain, x_aug)
    assert abs(x_plain.mean().item()) < 0.1  # centred by the training set's own statistics


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
    loader = data.TrainBatches(train, 32, normalization=data.normalization("synthetic"), seed=0)
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
        for images, labels in data.EvalBatches(test, 250, normalization=data.normalization("synthetic")):
            correct += (model(images).argmax(1) == labels).sum().item()
    assert correct / len(test) > 0.5


# ------------------------------------------------------------ augmentation


def test_auto_augment_fits_the_data_set() -> None:
    assert data.resolve_augment("auto", "cifar10") == "crop-flip"
    assert data.resolve_augment("auto", "synthetic") == "crop-flip"
    assert data.resolve_augment("auto", "npz") == "none"
    assert data.resolve_augment("flip", "npz") == "flip"
    with pytest.raises(ValueError, match="'mirror'.*crop-flip"):
        data.resolve_augment("mirror", "npz")


@pytest.mark.parametrize(("height", "width", "padding"),
                         [(32, 32, (4, 4)), (8, 8, (1, 1)), (224, 224, (28, 28)), (16, 48, (2, 6)), (4, 4, (1, 1))])
def test_crop_padding_scales_with_the_image_side(height, width, padding) -> None:
    assert data.crop_padding(height, width) == padding


UNIT = data.Normalization((0.0,), (1.0,))


def _batches(images: np.ndarray, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = data.ImageArrays(images, np.arange(len(images), dtype=np.int64))  # label = index
    loader = data.TrainBatches(arrays, len(images), normalization=UNIT, augment=augment, seed=0)
    (batch, order), = list(loader)
    return batch, torch.from_numpy(images)[order].float() / 255


def _random_images(n: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 1, height, width), dtype=np.uint8)


def test_none_leaves_images_untouched() -> None:
    batch, original = _batches(_random_images(16, 8, 8), "none")
    torch.testing.assert_close(batch, original)


def test_flip_never_crops() -> None:
    torch.manual_seed(1)
    batch, original = _batches(_random_images(64, 8, 12), "flip")
    flipped = [torch.allclose(b, o.flip(-1)) for b, o in zip(batch, original)]
    assert all(torch.allclose(b, o) or f for b, o, f in zip(batch, original, flipped))
    assert 0 < sum(flipped) < 64


@pytest.mark.parametrize(("height", "width"), [(8, 8), (12, 20), (40, 24)])
def test_crop_is_a_shifted_window_of_the_same_non_square_shape(height, width) -> None:
    torch.manual_seed(2)
    batch, original = _batches(_random_images(32, height, width), "crop")
    assert batch.shape == (32, 1, height, width)
    pad_h, pad_w = data.crop_padding(height, width)
    for cropped, image in zip(batch, original):
        padded = torch.nn.functional.pad(image, (pad_w, pad_w, pad_h, pad_h))
        windows = [padded[:, t:t + height, x:x + width] for t in range(2 * pad_h + 1) for x in range(2 * pad_w + 1)]
        assert any(torch.allclose(cropped, w) for w in windows)


# ------------------------------------------------------------ normalisation


def test_npz_statistics_are_numpys_over_the_whole_training_set(tmp_path: Path, nchw: dict) -> None:
    path = write_npz(tmp_path / "d.npz", **nchw)
    stats = data.normalization("npz", path)
    pixels = nchw["x_train"].astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 2, 3)), rtol=1e-9)
    # every node reading the file normalises with the whole file's statistics, not its partition's
    parts = [data.load_partition("npz", pid, 3, data_path=path) for pid in range(3)]
    assert any(data.image_statistics(p.images) != stats for p in parts)
    assert data.normalization("npz", path) == stats


def test_statistics_are_chunked_and_survive_a_constant_channel() -> None:
    images = np.random.default_rng(3).integers(0, 256, (9000, 2, 3, 5), dtype=np.uint8)
    images[:, 1] = 7
    stats = data.image_statistics(images)
    np.testing.assert_allclose(stats.mean[0], images[:, 0].mean() / 255, rtol=1e-9)
    np.testing.assert_allclose(stats.std[0], (images[:, 0] / 255).std(), rtol=1e-7)
    assert stats.mean[1] == pytest.approx(7 / 255) and stats.std[1] == 1.0


# ----------------------------------------------------------- image shapes


@pytest.mark.parametrize(("height", "width"), [(8, 8), (12, 20), (33, 17), (224, 224)])
def test_any_image_size_trains_and_evaluates(tmp_path: Path, height: int, width: int) -> None:
    from resist_fl.core.model import ModelSpec, build_model

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (6, height, width, 3), dtype=np.uint8), "y_train": np.arange(6) % 3,
              "x_test": rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8), "y_test": np.arange(4) % 3}
    path = write_npz(tmp_path / "d.npz", **arrays)
    info = data.dataset_info("npz", path)
    assert info == data.DatasetInfo(3, 3, (height, width))
    model = build_model(ModelSpec(depths=(1, 1, 2, 1), num_classes=3, base_width=4))
    stats = data.normalization("npz", path)
    train = data.TrainBatches(data.load_partition("npz", 0, 1, data_path=path), 3, normalization=stats,
                                   augment="crop-flip")
    images, labels = next(iter(train))
    assert images.shape == (3, 3, height, width)
    nn.functional.cross_entropy(model(images), labels).backward()
    test = data.EvalBatches(data.load_test_set("npz", path), 4, normalization=stats)
    with torch.no_grad():
        assert model(next(iter(test))[0]).shape == (4, 3)


# ------------------------------------------------------------ malformed npz


def _good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (10, 8, 8), dtype=np.uint8), "y_train": np.arange(10) % 2,
            "x_test": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), "y_test": np.arange(4) % 2}


MALFORMED = {
    "5-d images": ("x_train", lambda a: {**a, "x_train": a["x_train"][:, None, None]}, "expected N x H x W"),
    "4 channels": ("x_test", lambda a: {**a, "x_test": np.zeros((4, 8, 8, 4), np.uint8)}, "expected N x H x W"),
    "floats above 255": ("x_train", lambda a: {**a, "x_train": a["x_train"] * 2.0}, "outside|in \\[0, 510\\]"),
    "negative pixels": ("x_test", lambda a: {**a, "x_test": a["x_test"].astype(np.int16) - 300}, "expected pixel"),
    "floats in [0, 1]": ("x_train", lambda a: {**a, "x_train": a["x_train"] / 255.0}, "multiply"),
    "nan pixels": ("x_train", lambda a: {**a, "x_train": np.full((10, 8, 8), np.nan)}, "NaN"),
    "string images": ("x_train", lambda a: {**a, "x_train": np.full((10, 8, 8), "a")}, "dtype <U1"),
    "negative labels": ("y_train", lambda a: {**a, "y_train": a["y_train"] - 1}, "label -1"),
    "uint64 labels that wrap": ("y_train", lambda a: {**a, "y_train": np.array([2**64 - 1] + [1] * 9, np.uint64)},
                                f"label {2**64 - 1}"),
    "float labels": ("y_test", lambda a: {**a, "y_test": a["y_test"] + 0.5}, "integer labels"),
    "mismatched lengths": ("y_train", lambda a: {**a, "y_train": a["y_train"][:7]}, "10 images but y_train has 7"),
    "no images": ("x_test", lambda a: {**a, "x_test": a["x_test"][:0], "y_test": a["y_test"][:0]}, "no images"),
    "pickle": ("y_test", lambda a: {**a, "y_test": np.array([{"label": 1}] * 4, dtype=object)}, "pickle"),
    "other image size": ("x_test", lambda a: {**a, "x_test": np.zeros((4, 9, 8), np.uint8)}, "9x8"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_each_malformed_npz_stops_with_a_clear_error(tmp_path: Path, kind: str) -> None:
    key, damage, expected = MALFORMED[kind]
    path = tmp_path / f"{kind.replace(' ', '_')}.npz"
    np.savez(path, **damage(_good()))
    with pytest.raises(data.DataError, match=expected) as error:
        data.load_test_set("npz", str(path))
    message = str(error.value)
    assert str(path) in message and key in message


@pytest.mark.parametrize("content", [b"not a zip file", b""])
def test_a_file_that_is_no_npz_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match="cannot be read as a NumPy .npz archive"):
        data.dataset_info("npz", str(path))
