"""A local ImageFolder-style directory (ImageNet's layout): ``data-path/train/<class>/<image>`` and
``data-path/val/<class>/<image>`` (or ``test/``), any format PIL reads.

Files are listed and decoded by torchvision's :class:`~torchvision.datasets.ImageFolder` (classes:
the sorted sub-directory names of ``train``, the same in the evaluation split). Every image is
decoded once into uint8 arrays, the torchvision-standard way for a crop of ``image_size``
(224 for ImageNet), with ``resize = round(image_size * 256 / 224)``:

- training images: shorter side resized to ``resize``, centre square of ``resize`` kept; the
  training augmentation then takes a random-resized crop of it (:mod:`resist_fl.data.batches`);
- evaluation images: shorter side resized to ``resize``, centre crop of ``image_size`` (exactly
  torchvision's ``Resize(resize) + CenterCrop(image_size)``).

The same images can come from the Hugging Face hub instead: ``data-path='hf:<dataset id>'`` (or
``hf:<dataset id>@<config>``, e.g. ``hf:frgfm/imagenette@320px``), loaded with ``datasets`` (the
library under flwr-datasets): its ``train`` split, its ``validation`` (or ``val``/``test``) split, the
first Image column and the first ClassLabel column, decoded the same way.

Before an image is decoded its size is read from its header and refused (a ``DataError`` naming
the file) past :data:`MAX_ASPECT_RATIO` or :data:`MAX_IMAGE_PIXELS`, and decompression bombs are
refused the same way; decoding therefore never allocates more than such an image needs.

Keeping a square of the training image instead of the whole image is what makes a split one
tensor (and the device-resident batches possible); the random-resized crop therefore draws its
boxes from that square. The whole split is held in memory (and on the training device): this
suits ImageNet-style subsets (e.g. Imagenette, 100 classes) per node, not all of ImageNet on one.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np

from resist_fl.data.arrays import DataError, ImageArrays

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "test")
HUB_PREFIX = "hf:"
HUB_EVAL_SPLITS = ("validation", "val", "test")
IMAGE_SIZES = (16, 1024)
"""Accepted ``image-size`` range (the crop the model sees)."""
MAX_ASPECT_RATIO = 10.0
"""Longest side / shortest side of an accepted image (a 1x40000 strip is refused, not resized to
18x720000)."""
MAX_IMAGE_PIXELS = 50_000_000
"""Most pixels of an accepted image (below PIL's own decompression-bomb limit of ~179 million)."""


def resize_size(image_size: int) -> int:
    """The shorter side images are resized to before cropping ``image_size`` (256 for 224)."""
    return int(round(image_size * 256 / 224))


def evaluation_crop(arrays: ImageArrays, image_size: int) -> ImageArrays:
    """Training images (stored at :func:`resize_size`, square) centre-cropped to ``image_size``, as the
    evaluation split is: training images held out for validation are evaluated like test images."""
    import torch
    from torchvision.transforms.v2 import functional

    cropped = functional.center_crop(torch.from_numpy(np.ascontiguousarray(arrays.images)), [image_size] * 2)
    return ImageArrays(cropped.numpy(), arrays.labels)


def imagefolder_root(data_path: str) -> Path:
    """The checked root directory: absolute, with a ``train`` and a ``val`` (or ``test``) folder."""
    root = Path(data_path).expanduser()
    if not data_path or not root.is_absolute():
        raise DataError(f"data-path = {data_path!r}: dataset 'imagefolder' needs the absolute path of a "
                        "directory holding train/<class>/... and val/<class>/...")
    if not (root / TRAIN_SPLIT).is_dir():
        raise DataError(f"data-path = {data_path!r}: no {TRAIN_SPLIT}/ directory in it; expected "
                        f"{TRAIN_SPLIT}/<class>/<image> and val/<class>/<image>")
    if not any((root / s).is_dir() for s in EVAL_SPLITS):
        raise DataError(f"data-path = {data_path!r}: no val/ (or test/) directory in it; expected "
                        f"{TRAIN_SPLIT}/<class>/<image> and val/<class>/<image>")
    return root


def imagefolder_source_key(data_path: str, image_size: int) -> tuple:
    """What the decoded splits depend on: the directory, its splits' modification times (a file
    added or removed changes its class folder's time, and so the folder listing), the size; for
    the hub, the dataset id and the size."""
    if data_path.startswith(HUB_PREFIX):
        return "imagefolder-hub", data_path[len(HUB_PREFIX):], (), int(image_size)
    root = imagefolder_root(data_path)
    stamps = tuple(sorted((str(p.relative_to(root)), p.stat().st_mtime_ns)
                          for split in (TRAIN_SPLIT, *EVAL_SPLITS) if (root / split).is_dir()
                          for p in [root / split, *(root / split).iterdir()] if p.is_dir()))
    return "imagefolder", str(root), stamps, int(image_size)


def imagefolder_splits(data_path: str, image_size: int = 224) -> tuple[ImageArrays, ImageArrays]:
    """The decoded training and evaluation splits (cached per process and source key)."""
    if not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise DataError(f"image-size = {image_size}: expected {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels")
    return _decoded(imagefolder_source_key(data_path, image_size))


@functools.lru_cache(maxsize=2)
def _decoded(key: tuple) -> tuple[ImageArrays, ImageArrays]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    kind, root, _, image_size = key
    resize = resize_size(image_size)
    train_pipeline = v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(resize)])
    eval_pipeline = v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    if kind == "imagefolder-hub":
        return _hub_decoded(root, train_pipeline, eval_pipeline)
    root = Path(root)
    eval_split = next(s for s in EVAL_SPLITS if (root / s).is_dir())
    try:
        train = ImageFolder(str(root / TRAIN_SPLIT))
        evaluation = ImageFolder(str(root / eval_split))
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"data-path = {str(root)!r}: {err}") from err
    if evaluation.classes != train.classes:
        raise DataError(f"data-path = {str(root)!r}: {eval_split}/ has classes {evaluation.classes[:5]}... but "
                        f"{TRAIN_SPLIT}/ has {train.classes[:5]}...; expected the same class folders in both")
    return _arrays(train, train_pipeline), _arrays(evaluation, eval_pipeline)


def _hub_decoded(name: str, train_pipeline, eval_pipeline) -> tuple[ImageArrays, ImageArrays]:
    """A hub dataset's train and evaluation splits through the pipelines."""
    import datasets

    hub_id, _, config = name.partition("@")
    try:
        loaded = datasets.load_dataset(hub_id, config or None)
    except Exception as err:  # any hub, network or cache failure
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data-path = {HUB_PREFIX + name!r}: the Hugging Face hub could not provide it ({reason}). "
                        "Offline, load it once with network access (it is then cached), or use a local "
                        "directory: data-path='/abs/dir' with train/<class>/... and val/<class>/...") from err
    if TRAIN_SPLIT not in loaded or not (evals := [s for s in HUB_EVAL_SPLITS if s in loaded]):
        raise DataError(f"data-path = {HUB_PREFIX + name!r} has splits {sorted(loaded)}; expected 'train' and "
                        f"one of {', '.join(HUB_EVAL_SPLITS)}")
    features = loaded[TRAIN_SPLIT].features
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not images or not labels:
        raise DataError(f"data-path = {HUB_PREFIX + name!r} has columns {dict(features)}; expected an Image and a "
                        "ClassLabel column")

    def decode(split, pipeline) -> ImageArrays:
        rows = loaded[split]
        arrays = []
        for index, image in enumerate(rows[images[0]]):
            checked_size(*image.size, f"data-path = {HUB_PREFIX + name!r}: {split} image {index}")
            arrays.append(pipeline(image.convert("RGB")).numpy())
        return ImageArrays(np.stack(arrays).astype(np.uint8), np.asarray(rows[labels[0]], dtype=np.int64))

    return decode(TRAIN_SPLIT, train_pipeline), decode(evals[0], eval_pipeline)


def checked_size(width: int, height: int, where: str) -> None:
    """DataError naming ``where`` unless a ``width`` x ``height`` image may be decoded: at least
    1x1, at most :data:`MAX_ASPECT_RATIO` : 1 and :data:`MAX_IMAGE_PIXELS` pixels (checked from the
    header, before decoding; resizing the shorter side to ``image-size`` would otherwise blow an
    elongated image up to gigabytes)."""
    if width < 1 or height < 1:
        raise DataError(f"{where}: the image is {width}x{height} pixels; expected at least 1x1")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"{where}: the image is {width}x{height} pixels, an aspect ratio of "
                        f"{max(width, height) / min(width, height):.0f}:1; expected at most {MAX_ASPECT_RATIO:g}:1 "
                        "(crop it, or remove it)")
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: the image is {width}x{height} = {width * height} pixels; expected at most "
                        f"{MAX_IMAGE_PIXELS} (downscale it, or remove it)")


def open_rgb(path: str):
    """The image at ``path`` as an RGB PIL image, its size checked before decoding
    (:func:`checked_size`); any unreadable image or decompression bomb is a DataError naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                checked_size(*image.size, path)
                return image.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: refused as a decompression bomb ({err}); expected at most "
                        f"{MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err}); remove it or replace it") from None


def _arrays(folder, pipeline) -> ImageArrays:
    """Every image of ``folder`` through ``pipeline``, as RGB uint8 NCHW arrays and int64 labels."""
    images, labels = [], []
    for path, label in folder.samples:
        images.append(pipeline(open_rgb(path)).numpy())
        labels.append(label)
    return ImageArrays(np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64))

