"""Hostile files stop a run with a clear error and cost nothing beyond the data they name (issue 21,
items 4-6): npz archives and ImageFolder images (DataError naming the file and member or image),
checkpoints (CheckpointError naming the field, the file untouched) and run directories (confined
under output-dir; SettingsError)."""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resist_fl.data import DataError
from resist_fl.data.imagefolder import MAX_ASPECT_RATIO, imagefolder_splits
from resist_fl.data.npz import npz_splits
from resist_fl.run.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, capture_rngs, open_run_directory
from resist_fl.run.outputs import METRICS_FILE, run_directory
from resist_fl.run.settings import SettingsError

# -- npz ----------------------------------------------------------------------------------------------


def npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def good_members() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"x_train.npy": npy(rng.integers(0, 255, (20, 8, 8), dtype=np.uint8)),
            "y_train.npy": npy(np.arange(20) % 4), "x_test.npy": npy(rng.integers(0, 255, (6, 8, 8), dtype=np.uint8)),
            "y_test.npy": npy(np.arange(6) % 4)}


def write_npz(path: Path, members: dict[str, bytes], compress: bool = False) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def claiming(shape: tuple[int, ...], dtype: str = "|u1", tail: bytes = b"\0" * 64) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + tail


def test_a_well_formed_npz_still_loads(tmp_path):
    train, test = npz_splits(write_npz(tmp_path / "ok.npz", good_members()))
    assert train.images.shape == (20, 1, 8, 8) and test.labels.tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("name", ["x_train", "x_train.npy"])
def test_a_member_that_is_not_npy_is_a_data_error(tmp_path, name):
    members = {k: v for k, v in good_members().items() if k != "x_train.npy"}
    members[name] = b"these are not the bytes of an array"
    with pytest.raises(DataError, match=r"ok.npz'?: x_train is not a \.npy array"):
        npz_splits(write_npz(tmp_path / "ok.npz", members))


@pytest.mark.parametrize("compress", [False, True])
def test_a_header_claiming_64_tib_allocates_nothing_like_it(tmp_path, compress):
    members = {**good_members(), "x_train.npy": claiming((2**46,))}
    path = write_npz(tmp_path / "bomb.npz", members, compress)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"x_train: its header claims shape \(70368744177664,\) of uint8 "
                                            r"\(70368744177664 bytes\) but the member holds 64 bytes"):
            npz_splits(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6


def test_zero_size_images_are_a_data_error(tmp_path):
    members = {**good_members(), "x_train.npy": npy(np.zeros((20, 0, 0), np.uint8))}
    with pytest.raises(DataError, match=r"x_train has shape \(20, 0, 0\), images without pixels"):
        npz_splits(write_npz(tmp_path / "empty.npz", members))


def test_a_label_of_a_billion_is_a_data_error(tmp_path):
    members = {**good_members(), "y_test.npy": npy(np.array([0, 1, 2, 3, 0, 10**9]))}
    with pytest.raises(DataError, match=r"the largest label is 1000000000, i\.e\. 1000000001 classes for 20 "
                                        r"training images"):
        npz_splits(write_npz(tmp_path / "labels.npz", members))


def test_an_object_member_is_never_unpickled(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members = {**good_members(), "y_train.npy": buffer.getvalue()}
    with pytest.raises(DataError, match="y_train holds Python objects"):
        npz_splits(write_npz(tmp_path / "pickle.npz", members))


# -- ImageFolder ----------------------------------------------------------------------------------------

def image_folder(root: Path, odd: tuple[str, bytes] | None = None) -> Path:
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 24, 3), 40 * i + 60 * (name == "b"), np.uint8)).save(
                    root / split / name / f"{i}.png")
    if odd is not None:
        (root / "train" / "a" / odd[0]).write_bytes(odd[1])
    return root


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (a few dozen bytes: a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    strip = png_bytes(Image.new("L", (40000, 1)))
    assert len(strip) < 1000  # 0.2 kB on disk; resized to 18x720000 before this check
    root = image_folder(tmp_path / "strip", ("strip.png", strip))
    import torchvision.datasets  # noqa: F401 - imported before measuring (with the transforms): not the image cost
    import torchvision.transforms.v2  # noqa: F401

    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"strip\.png: the image is 40000x1 pixels, an aspect ratio of "
                                            rf"40000:1; expected at most {MAX_ASPECT_RATIO:g}:1"):
            imagefolder_splits(str(root), 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10e6  # resized, the strip alone would be 18 x 720000 x 3 bytes = 39 MB


@pytest.mark.parametrize("size", [(12000, 12000), (30000, 30000)])  # PIL: a warning, then an error
def test_a_decompression_bomb_is_a_data_error(tmp_path, size):
    root = image_folder(tmp_path / "bomb", ("bomb.png", png_header_only(*size)))
    with pytest.raises(DataError, match=r"bomb\.png: refused as a decompression bomb"):
        imagefolder_splits(str(root), 16)


def test_a_corrupt_image_is_a_data_error(tmp_path):
    root = image_folder(tmp_path / "corrupt", ("bad.png", b"\x89PNG\r\n\x1a\n not really"))
    with pytest.raises(DataError, match=r"bad\.png: cannot be read as an image"):
        imagefolder_splits(str(root), 16)


# -- checkpoints -----------------------------------------------------------------------------------------

def saved_checkpoint(run_dir: Path) -> Path:
    rows = [{"round": 1, "accuracy": 0.5, "num-subnetworks": 2}, {"round": 2, "accuracy": None}]
    Checkpoint(2, {"w": np.ones(3, np.float32), "n": np.zeros((), np.int64)}, {"seed": 0}, rows,
               *capture_rngs()).save(run_dir)
    return run_dir / CHECKPOINT_FILE


def _nan_metric(raw):
    raw["metrics"][0]["accuracy"] = float("nan")


CHECKPOINT_CASES = {
    "missing-key": (lambda raw: raw.pop("metrics"), "lacks the field\\(s\\) metrics"),
    "arrays-a-list": (lambda raw: raw.update(arrays=[torch.ones(3)]), "arrays is list, expected a mapping"),
    "array-not-a-tensor": (lambda raw: raw["arrays"].update(w=[1.0, 2.0]), "arrays\\['w'\\] is list"),
    "round-float": (lambda raw: raw.update(server_round=1.5), "server_round is 1.5, expected a whole number"),
    "round-string": (lambda raw: raw.update(server_round="2"), "server_round is '2'"),
    "round-negative": (lambda raw: raw.update(server_round=-1), "server_round is -1"),
    "row-not-a-mapping": (lambda raw: raw["metrics"].append([3, 0.5]), "metrics\\[2\\] is list, expected a mapping"),
    "row-round-beyond": (lambda raw: raw["metrics"][1].update(round=7), "metrics\\[1\\]\\['round'\\] is 7"),
    "nan-array": (lambda raw: raw["arrays"]["w"].fill_(float("nan")), "arrays\\['w'\\] is .*NaN or Inf"),
    "inf-array": (lambda raw: raw["arrays"]["w"].fill_(float("inf")), "arrays\\['w'\\] is .*NaN or Inf"),
    "nan-metric": (_nan_metric, "metrics\\[0\\]\\['accuracy'\\] is nan, expected a finite number"),
    "metrics-not-a-list": (lambda raw: raw.update(metrics={"round": 1}), "metrics is dict, expected a list"),
    "run-config-not-a-mapping": (lambda raw: raw.update(run_config=[1]), "run_config is list"),
    "python-rng": (lambda raw: raw.update(python_rng=(3, (1, 2), None)), "python_rng is tuple"),
    "torch-rng": (lambda raw: raw.update(torch_rng=torch.zeros(3)), "torch_rng is Tensor"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_bad_checkpoint_field_is_a_checkpoint_error_and_the_file_is_untouched(tmp_path, case):
    path = saved_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    tamper, message = CHECKPOINT_CASES[case]
    tamper(raw)
    torch.save(raw, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.load(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_good_checkpoint_round_trips(tmp_path):
    saved_checkpoint(tmp_path)
    loaded = Checkpoint.load(tmp_path)
    assert loaded.server_round == 2 and loaded.metrics[1]["accuracy"] is None
    np.testing.assert_array_equal(loaded.arrays["w"], np.ones(3, np.float32))
    loaded.restore_rngs()


# -- run directories ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc/x", "a/../../b", "/etc/x", "~/x", ".."])
def test_a_run_name_cannot_leave_output_dir(tmp_path, name):
    with pytest.raises(SettingsError, match="run-name = .*expected a relative name inside output-dir"):
        run_directory(str(tmp_path / "runs"), name, "resist")


def test_a_symlinked_run_directory_cannot_leave_output_dir(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SettingsError, match="outside output-dir"):
        run_directory(str(tmp_path / "runs"), "link", "resist")
    assert run_directory(str(tmp_path / "runs"), "study/seed-0", "resist") == tmp_path / "runs" / "study" / "seed-0"


def test_a_dangling_metrics_symlink_is_refused_and_its_target_not_written(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    target = tmp_path / "victim.txt"
    (run_dir / METRICS_FILE).symlink_to(target)  # dangling: target does not exist
    with pytest.raises(SettingsError, match="metrics.jsonl is a symbolic link"):
        run_directory(str(tmp_path / "runs"), "r", "resist")
    with pytest.raises(SettingsError, match="metrics.jsonl is a symbolic link"):
        open_run_directory(run_dir, {}, resume=False)
    assert not target.exists()
