"""ImageNet-sized runs: the ImageNet stem in the pre-activation family, ImageFolder directories and
the random-resized-crop augmentation; a small-input run on CPU end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.residual_nets import set_residual_scales
from resist_fl.data import DataError, load_test_set
from resist_fl.data.batches import (
    RESIZED_CROP_RATIO,
    RESIZED_CROP_SCALE,
    TrainBatches,
    random_resized_boxes,
    resized_crops,
)
from resist_fl.data.imagefolder import imagefolder_splits, resize_size
from resist_fl.data.transforms import Normalization
from resist_fl.run.outputs import load_model, read_metrics
from simulations.inprocess import run_inprocess

CLASSES = ("cat", "dog", "fish")


def make_image_folder(root: Path, per_class: int = 12, val_per_class: int = 4, seed: int = 0) -> Path:
    """An ImageFolder directory of learnable photos-to-be: each class a colour and a stripe
    direction, random sizes and aspect ratios, saved as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    colours = {"cat": (200, 60, 40), "dog": (40, 180, 60), "fish": (50, 70, 210)}
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = int(rng.integers(24, 60)), int(rng.integers(24, 60))
                yy, xx = np.mgrid[:height, :width]
                stripes = np.sin((xx if label % 2 else yy) * (0.6 + 0.3 * label))[..., None]
                noise = rng.normal(0, 12, (height, width, 3))
                pixels = np.clip(np.array(colours[name]) * (0.7 + 0.3 * stripes) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


def test_imagefolder_splits_are_decoded_the_torchvision_way(image_folder):
    train, val = imagefolder_splits(str(image_folder), image_size=32)
    side = resize_size(32)
    assert side == 37 and train.images.shape == (36, 3, side, side) and val.images.shape == (12, 3, 32, 32)
    assert train.images.dtype == np.uint8 and sorted(set(train.labels.tolist())) == [0, 1, 2]
    first = sorted((image_folder / "val" / "cat").iterdir())[0]  # class 0, ImageFolder's first file
    expected = v2.Compose([v2.PILToTensor(), v2.Resize(side, antialias=True), v2.CenterCrop(32)])(
        Image.open(first).convert("RGB"))
    np.testing.assert_array_equal(val.images[0], expected.numpy())
    assert load_test_set("imagefolder", str(image_folder), 32).images.shape == (12, 3, 32, 32)


def test_imagefolder_errors_name_the_problem(image_folder, tmp_path):
    with pytest.raises(DataError, match="absolute path"):
        imagefolder_splits("relative/dir", 32)
    with pytest.raises(DataError, match="no train/ directory"):
        imagefolder_splits(str(tmp_path), 32)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no val/ \(or test/\)"):
        imagefolder_splits(str(tmp_path), 32)
    odd = make_image_folder(tmp_path / "odd", per_class=2, val_per_class=1)
    (odd / "val" / "fish").rename(odd / "val" / "shark")
    with pytest.raises(DataError, match="the same class folders"):
        imagefolder_splits(str(odd), 32)


@pytest.mark.parametrize("height, width", [(40, 40), (30, 60)])
def test_random_resized_boxes_follow_torchvisions_distribution(height, width):
    count = 4000
    boxes = random_resized_boxes(count, height, width, torch.Generator().manual_seed(0), torch.device("cpu"))
    top, left, box_h, box_w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (top + box_h <= height) & (left + box_w <= width)).all())
    assert bool(((box_h >= 1) & (box_w >= 1)).all())
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    reference = torch.tensor([v2.RandomResizedCrop.get_params(image, list(RESIZED_CROP_SCALE),
                                                              list(RESIZED_CROP_RATIO)) for _ in range(count)],
                             dtype=torch.float32)
    area = boxes[:, 2] * boxes[:, 3] / (height * width), reference[:, 2] * reference[:, 3] / (height * width)
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2]), torch.log(reference[:, 3] / reference[:, 2])
    centre = (boxes[:, 0] + boxes[:, 2] / 2) / height, (reference[:, 0] + reference[:, 2] / 2) / height
    for a, b in (area, log_ratio, centre):  # means and spreads agree within sampling error
        assert abs(float(a.mean() - b.mean())) < 4 * math.sqrt(2 / count) * float(b.std()) + 1e-3
        assert abs(float(a.std() - b.std())) < 0.1 * float(b.std()) + 1e-3


def test_resized_crop_equals_torchvisions_resize_of_the_box():
    images = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[2.0, 5.0, 12.0, 18.0], [0.0, 0.0, 20.0, 30.0]])
    ours = resized_crops(images, boxes, 16, flip=torch.tensor([False, True]))
    for i, (top, left, h, w) in enumerate(boxes.int().tolist()):
        theirs = v2.functional.resized_crop(images[i].float(), top, left, h, w, [16, 16], antialias=False)
        if i == 1:
            theirs = theirs.flip(-1)
        torch.testing.assert_close(ours[i], theirs, atol=1e-3, rtol=0)


def test_train_batches_crop_imagefolder_images_to_the_image_size(image_folder):
    train, _ = imagefolder_splits(str(image_folder), image_size=32)
    stats = Normalization((0.5,) * 3, (0.25,) * 3)
    for augment in ("resized-crop-flip", "resized-crop", "none", "crop-flip"):
        images, _ = next(iter(TrainBatches(train, 8, normalization=stats, augment=augment, crop_size=32)))
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32, augment
    centre = next(iter(TrainBatches(train, 36, normalization=stats, augment="none", crop_size=32, seed=3)))
    order = torch.randperm(36, generator=torch.Generator().manual_seed(3))
    expected = (torch.from_numpy(train.images[order.numpy()][..., 2:34, 2:34]).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(centre[0], expected)


def test_imagenet_stem_subnetwork_matches_the_full_model_with_blocks_skipped():
    spec = ModelSpec(depths=(1, 1, 4, 1), num_classes=10, base_width=8, stem="imagenet")
    model = build_model(spec).eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    layout = BlockLayout.from_spec(spec)
    kept = ["layer3.1", "layer3.3"]
    sub = layout.build_subnetwork(spec, kept).eval()
    sub.load_state_dict({k: model.state_dict()[k] for k in layout.subnetwork_keys(kept)})
    set_residual_scales(model, {b: 0.0 for b in layout.dropped_blocks(kept)})
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sub(x), model(x))
        assert model.layer1(model.stem(model.conv1(x))).shape[-1] == 16  # 64 -> 32 (conv) -> 16 (pool)


def test_an_imagefolder_directory_trains_with_warmup_on_cpu(image_folder, tiny_config):
    config = {**tiny_config, "dataset": "imagefolder", "data-path": str(image_folder), "image-size": 32,
              "stem": "imagenet", "batch-size": 8, "local-steps": 3, "eval-batch-size": 12,
              "warmup-rounds": 1, "num-server-rounds": 2, "min-available-nodes": 2, "min-train-nodes": 2}
    run_inprocess(config, num_nodes=2)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    rows = read_metrics(run_dir)
    assert [r["phase"] for r in rows] == ["warmup", "resist"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["train-loss"]) for r in rows)
    model = load_model(run_dir / "model.pt")
    assert model.spec.stem == "imagenet" and model.linear.out_features == 3


def test_the_same_images_from_the_hub_path_decode_identically(image_folder):
    """data-path='hf:<id>' goes through Hugging Face datasets (here a local directory, which
    `datasets` reads as an image folder: the hub path without the network)."""
    local = imagefolder_splits(str(image_folder), 32)
    hub = imagefolder_splits(f"hf:{image_folder}", 32)
    for ours, theirs in zip(local, hub):
        order_ours, order_theirs = np.lexsort((ours.images.reshape(len(ours), -1).sum(1), ours.labels)), \
            np.lexsort((theirs.images.reshape(len(theirs), -1).sum(1), theirs.labels))
        np.testing.assert_array_equal(ours.labels[order_ours], theirs.labels[order_theirs])
        np.testing.assert_array_equal(ours.images[order_ours], theirs.images[order_theirs])
    with pytest.raises(DataError, match="hub could not provide it"):
        imagefolder_splits(f"hf:{image_folder}/does-not-exist", 32)
