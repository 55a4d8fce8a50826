"""Fashion-MNIST / MNIST from their original IDX files: where they are found, hostile headers,
and real Fashion-MNIST (Debian's dataset-fashion-mnist, installed by .ci/run) training well through
the same path a user's own files take."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from resist_fl.data import idx
from resist_fl.data.arrays import DataError
from resist_fl.data.idx import FILES, IMAGES_MAGIC, LABELS_MAGIC, idx_directory, idx_splits, read_idx

DEBIAN = Path(idx.IDX_DATASETS["fashion-mnist"].debian_dir)
needs_debian = pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist (.ci/run does)")


def _write(path: Path, magic: int, shape: tuple[int, ...], payload: bytes, zipped: bool = True) -> Path:
    data = struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + payload
    if zipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _tiny_set(directory: Path, zipped: bool = True, train: int = 20, test: int = 10) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        images, labels = FILES[split]
        _write(directory / images, IMAGES_MAGIC, (count, 28, 28),
               rng.integers(0, 256, count * 784, dtype=np.uint8).tobytes(), zipped)
        _write(directory / labels, LABELS_MAGIC, (count,), (np.arange(count) % 10).astype(np.uint8).tobytes(), zipped)
    return directory


@pytest.mark.parametrize("zipped", [True, False])
def test_the_four_files_are_read_from_data_path(tmp_path, zipped):
    idx_splits.cache_clear()
    _tiny_set(tmp_path / "fm", zipped)
    train, test = idx_splits("fashion-mnist", str(tmp_path / "fm"))
    assert train.images.shape == (20, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert train.labels.dtype == np.int64 and list(test.labels) == [i % 10 for i in range(10)]


def test_torchvisions_layout_under_data_path(tmp_path):
    _tiny_set(tmp_path / "root" / "FashionMNIST" / "raw")
    assert idx_directory("fashion-mnist", str(tmp_path / "root")) == tmp_path / "root" / "FashionMNIST" / "raw"
    _tiny_set(tmp_path / "root" / "MNIST" / "raw")
    assert idx_directory("mnist", str(tmp_path / "root")) == tmp_path / "root" / "MNIST" / "raw"


@pytest.mark.parametrize("header, payload, message", [
    ((0x00000903, (2, 28, 28)), b"\0" * 1568, "magic number 0x00000903; expected 0x00000803"),
    ((IMAGES_MAGIC, (4_000_000_000, 28, 28)), b"", "header shape"),
    ((IMAGES_MAGIC, (2, 0, 28)), b"", "header shape"),
    ((IMAGES_MAGIC, (2, 28, 28)), b"\0" * 100, "100 payload bytes; the header (2, 28, 28) announces 1568"),
    ((IMAGES_MAGIC, (2, 28, 28)), b"\0" * 1569, "more than 1568 payload bytes"),
])
def test_a_hostile_header_is_an_error_not_an_allocation(tmp_path, header, payload, message):
    path = _write(tmp_path / "x-idx3-ubyte", header[0], header[1], payload)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_idx(path, IMAGES_MAGIC)


def test_a_truncated_header_and_a_broken_gzip_are_data_errors(tmp_path):
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"\0\0\x08"))
    with pytest.raises(DataError, match="header bytes"):
        read_idx(tmp_path / "a.gz", IMAGES_MAGIC)
    (tmp_path / "b.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot be read"):
        read_idx(tmp_path / "b.gz", LABELS_MAGIC)


def test_nowhere_to_be_found_lists_every_place_looked_in(tmp_path, monkeypatch):
    import datasets

    idx_splits.cache_clear()
    monkeypatch.setitem(idx.IDX_DATASETS, "mnist",
                        idx.IdxSource("MNIST/raw", str(tmp_path / "no-debian"), "ylecun/mnist"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        idx_splits("mnist", str(tmp_path / "empty"))
    text = str(err.value)
    for place in ("data-path", "MNIST/raw", "no-debian", "apt-get install dataset-mnist", "ylecun/mnist", "no network"):
        assert place in text
    idx_splits.cache_clear()


@needs_debian
def test_real_fashion_mnist_from_the_debian_package():
    train, test = idx_splits("fashion-mnist")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10


@needs_debian
def test_real_fashion_mnist_trains_well_through_the_users_path(tiny_config, tmp_path):
    """The Debian files copied to a directory of the user's, named by data-path: two ResIST rounds over
    4 nodes reach well above chance on the 10,000 real test images."""
    from resist_fl.run.outputs import read_metrics
    from simulations.inprocess import run_inprocess

    shutil.copytree(DEBIAN, tmp_path / "my-fashion", ignore=shutil.ignore_patterns("*.md*"))
    config = {**tiny_config, "dataset": "fashion-mnist", "data-path": str(tmp_path / "my-fashion"),
              "stage-depths": "1,1,3,1", "base-width": 8, "num-server-rounds": 2, "local-steps": 40,
              "batch-size": 64, "lr": 0.05, "lr-schedule": "constant", "eval-batch-size": 2000,
              "min-train-nodes": 4, "min-available-nodes": 4}
    run_inprocess(config, num_nodes=4)
    rows = read_metrics(Path(config["output-dir"]) / config["run-name"])
    assert rows[-1]["accuracy"] > 0.6, rows[-1]
