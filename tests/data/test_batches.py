"""Device-resident batches: same augmentation as the per-sample torchvision pipeline, the
``augment`` setting respected, deterministic for a seed; the node-local partition cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl import data
from resist_fl.data.batches import DeviceImages, EvalBatches, TrainBatches
from resist_fl.data.partition_cache import cached_partition, partition_key
from benchmarks.per_sample_loader import build_transform, make_per_sample_loader

ROOT = Path(__file__).resolve().parents[2]
UNIT = data.Normalization((0.0,), (1.0,))
CHI2_999 = {17: 40.79, 49: 85.35}  # chi-square critical values at p = 0.001 for 17 and 49 degrees of freedom


def _marked(height: int, width: int, copies: int) -> data.ImageArrays:
    """``copies`` of one image whose pixels are 1..H*W: every crop window and flip is unique."""
    image = np.arange(1, height * width + 1, dtype=np.uint8).reshape(1, 1, height, width)
    return data.ImageArrays(np.repeat(image, copies, axis=0), np.zeros(copies, dtype=np.int64))


def _cells(batches, height: int, width: int) -> np.ndarray:
    """How often each (top, left, flipped) transformation of the marked image was drawn."""
    pad_h, pad_w = data.crop_padding(height, width)
    image = torch.arange(1, height * width + 1, dtype=torch.float32).reshape(height, width) / 255
    padded = torch.nn.functional.pad(image, (pad_w, pad_w, pad_h, pad_h))
    windows = [padded[t:t + height, left:left + width] for t in range(2 * pad_h + 1) for left in range(2 * pad_w + 1)]
    candidates = torch.stack(windows + [w.flip(-1) for w in windows])  # (cells, H, W)
    counts = np.zeros(len(candidates), dtype=np.int64)
    for images, _ in batches:
        match = (images[:, 0, None] - candidates[None]).abs().amax(dim=(2, 3)) < 1e-6  # (B, cells)
        assert match.sum(1).eq(1).all(), "every output is exactly one crop window, flipped or not"
        counts += match.sum(0).numpy()
    return counts


def _chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(("height", "width"), [(8, 8), (12, 20)])
def test_crops_and_flips_have_the_per_sample_pipelines_distribution(height: int, width: int) -> None:
    copies = 6000
    arrays = _marked(height, width, copies)
    batched = _cells(TrainBatches(arrays, 500, normalization=UNIT, augment="crop-flip", seed=3), height, width)
    torch.manual_seed(3)
    reference = _cells(make_per_sample_loader(arrays, 500, normalization=UNIT, augment="crop-flip", seed=3),
                       height, width)
    cells = len(batched)
    assert batched.sum() == reference.sum() == copies
    # both uniform over every window and both flips (the reference: torchvision's RandomCrop + flip) ...
    assert _chi2(batched, np.full(cells, copies / cells)) < CHI2_999[cells - 1]
    assert _chi2(reference, np.full(cells, copies / cells)) < CHI2_999[cells - 1]
    # ... and the same distribution as each other (two-sample homogeneity)
    pooled = (batched + reference) / 2
    assert _chi2(batched, pooled) + _chi2(reference, pooled) < CHI2_999[cells - 1]


@pytest.mark.parametrize("augment", ["none", "crop", "flip", "crop-flip"])
def test_batches_respect_augment(augment: str) -> None:
    height, width = 8, 8
    counts = _cells(TrainBatches(_marked(height, width, 800), 200, normalization=UNIT, augment=augment, seed=0),
                    height, width)
    windows = len(counts) // 2
    centre = windows // 2  # top = pad_h, left = pad_w: the image itself
    used = set(np.flatnonzero(counts))
    crops = {cell % windows for cell in used}
    flips = {cell // windows for cell in used}
    assert crops == ({centre} if augment in ("none", "flip") else set(range(windows)))
    assert flips == ({0} if augment in ("none", "crop") else {0, 1})


def test_batches_normalise_like_the_per_sample_pipeline() -> None:
    arrays = data.load_partition("synthetic", 0, 4)
    stats = data.normalization("synthetic")
    (batched, labels), = list(EvalBatches(arrays, len(arrays), normalization=stats))
    transform = build_transform("none", stats, *arrays.images.shape[2:])
    reference = torch.stack([transform(torch.from_numpy(image)) for image in arrays.images])
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, torch.from_numpy(arrays.labels))


def test_batches_are_deterministic_for_a_seed_whatever_the_global_generator() -> None:
    arrays = data.load_partition("synthetic", 0, 10)

    def run(seed: int, global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        loader = TrainBatches(arrays, 32, normalization=UNIT, augment="crop-flip", seed=seed)
        return [images for _ in range(2) for images, _ in loader]  # two passes: two shuffles

    first, again, other = run(5, 0), run(5, 123), run(6, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[len(first) // 2])  # the second pass reshuffles


def test_cpu_training_is_deterministic_for_a_seed() -> None:
    from resist_fl.core.model import ModelSpec, build_model
    from resist_fl.node.training import train

    arrays = data.load_partition("synthetic", 0, 10)

    def trained() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(ModelSpec(depths=(1, 1, 2, 1), num_classes=10, base_width=4))
        loader = TrainBatches(arrays, 16, normalization=data.normalization("synthetic"), augment="crop-flip", seed=1)
        train(model, loader, steps=8, lr=0.05, momentum=0.9, weight_decay=5e-4, device=torch.device("cpu"))
        return model.state_dict()

    first, second = trained(), trained()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_device_images_hold_uint8_and_are_reused_without_a_copy() -> None:
    arrays = data.load_partition("synthetic", 0, 10)
    resident = DeviceImages.from_arrays(arrays, "cpu")
    assert resident.images.dtype == torch.uint8 and resident.labels.dtype == torch.int64
    loader = data.TrainBatches(resident, 16, normalization=UNIT, device="cpu")
    assert loader.data is resident
    assert sum(len(labels) for _, labels in loader) == len(arrays)
    read_only = data.ImageArrays(np.require(arrays.images, requirements="C"), arrays.labels)
    read_only.images.flags.writeable = False  # as memory-mapped from the partition cache
    assert torch.equal(DeviceImages.from_arrays(read_only).images, resident.images)


def test_batch_size_and_normalization_are_checked() -> None:
    arrays = data.load_partition("synthetic", 0, 10)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TrainBatches(arrays, 0, normalization=UNIT)
    with pytest.raises(ValueError, match="augment 'auto' is not resolved"):
        TrainBatches(arrays, 4, normalization=UNIT, augment="auto")
    with pytest.raises(ValueError, match="normalization has 2 channels; the images have 3"):
        EvalBatches(arrays, 4, normalization=data.Normalization((0.5, 0.5), (1.0, 1.0)))


# ------------------------------------------------------------ partition cache


def test_partition_cache_decodes_once_and_memory_maps(tmp_path: Path) -> None:
    arrays = data.load_partition("synthetic", 1, 5)
    calls = []

    def load() -> data.ImageArrays:
        calls.append(1)
        return arrays

    key = partition_key("synthetic", "", partition_id=1, num_partitions=5)
    first = cached_partition(str(tmp_path), key, load)
    second = cached_partition(str(tmp_path), key, load)
    assert len(calls) == 1
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert cached_partition("", key, load) is arrays and len(calls) == 2  # '' turns the cache off
    assert not list((tmp_path / key).glob("*.tmp"))


def test_partition_cache_key_follows_the_settings_and_the_source_file(tmp_path: Path) -> None:
    source = tmp_path / "d.npz"
    np.savez(source, x=np.zeros(3))
    key = partition_key("npz", str(source), partition_id=0, num_partitions=2)
    assert key == partition_key("npz", str(source), partition_id=0, num_partitions=2)
    assert key != partition_key("npz", str(source), partition_id=1, num_partitions=2)
    np.savez(source, x=np.zeros(4))  # the user replaced the file: a new entry
    assert key != partition_key("npz", str(source), partition_id=0, num_partitions=2)


def test_a_damaged_cache_entry_is_decoded_again(tmp_path: Path) -> None:
    arrays = data.load_partition("synthetic", 0, 5)
    key = partition_key("synthetic", "", partition_id=0, num_partitions=5)
    cached_partition(str(tmp_path), key, lambda: arrays)
    (tmp_path / key / "images.npy").write_bytes(b"not an array")
    again = cached_partition(str(tmp_path), key, lambda: arrays)
    np.testing.assert_array_equal(again.images, arrays.images)
    np.testing.assert_array_equal(cached_partition(str(tmp_path), key, lambda: None).images, arrays.images)


def test_the_client_app_imports_neither_torchvision_nor_the_hub_stack() -> None:
    code = ("import sys, client_app.app; "
            "print(sorted(m for m in ('torchvision', 'datasets', 'flwr_datasets', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
