"""A user's own images: a local ``.npz`` file.

The file holds ``x_train``, ``y_train``, ``x_test`` and ``y_test``: images as
NHWC, NCHW (1 or 3 channels) or grayscale NHW, any height and width, as uint8
or as numbers in [0, 255]; integer labels in [0, classes), where ``classes`` is
one more than the largest label of the file (the server's file sets it for the
run; a node whose own file has a larger label is refused), and at most the number of training
images (a label of 10**9 is a corrupt file, not a billion classes). Members are read without
trusting their headers (a header claiming more data than the member holds is refused before
anything that large is allocated). Anything else stops the run before
round 1 with a :class:`~resist_fl.data.arrays.DataError` that names the file,
the key and what was expected.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile

import numpy as np

from resist_fl.data.arrays import DataError, ImageArrays, to_nchw

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""Arrays a ``dataset='npz'`` file must contain."""

_EXPECTED_IMAGES = "N x H x W (grayscale), N x H x W x C or N x C x H x W with C = 1 or 3"


def npz_path(data_path: str) -> str:
    """Validate the ``npz`` data path and return it."""
    if not data_path or not os.path.isabs(data_path):
        raise DataError(
            f"dataset='npz' needs an absolute data-path to a .npz file with keys "
            f"{', '.join(NPZ_KEYS)}; got {data_path!r}"
        )
    if not os.path.isfile(data_path):
        raise DataError(
            f"npz file {data_path!r} not found; expected a NumPy archive with keys "
            f"{', '.join(NPZ_KEYS)}"
        )
    return data_path


def npz_splits(data_path: str) -> tuple[ImageArrays, ImageArrays]:
    """The (cached) train and test splits of an ``npz`` file."""
    path = npz_path(data_path)
    return _read_npz(path, os.stat(path).st_mtime_ns)


def npz_source_key(data_path: str) -> tuple:
    """What identifies the file's contents (path and modification time)."""
    path = npz_path(data_path)
    return ("npz", path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_npz(path: str, mtime_ns: int) -> tuple[ImageArrays, ImageArrays]:
    """Read and validate an ``npz`` file; ``mtime_ns`` invalidates the cache."""
    del mtime_ns  # only part of the cache key
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"npz file {path!r} cannot be read as a NumPy .npz archive ({error}); "
                        f"expected one written by numpy.savez with keys {', '.join(NPZ_KEYS)}") from None
    with archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        missing = [key for key in NPZ_KEYS if key not in members]
        if missing:
            raise DataError(
                f"npz file {path!r} lacks the keys {', '.join(missing)}; "
                f"expected {', '.join(NPZ_KEYS)}"
            )
        arrays = {key: _read_member(archive, members[key], path, key) for key in NPZ_KEYS}
    train = _split(path, "train", arrays["x_train"], arrays["y_train"])
    test = _split(path, "test", arrays["x_test"], arrays["y_test"])
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"npz file {path!r}: x_train images are {_describe(train.images)} but x_test "
                        f"images are {_describe(test.images)}; expected the same channels and size")
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    if classes > len(train.labels):
        raise DataError(f"npz file {path!r}: the largest label is {classes - 1}, i.e. {classes} classes for "
                        f"{len(train.labels)} training images; expected labels in [0, classes) with at most as "
                        "many classes as training images (remap the labels to 0, 1, 2, ...)")
    return train, test


_CHUNK = 1 << 24  # bytes read from an archive member at a time


def _read_member(archive: zipfile.ZipFile, member: str, path: str, key: str) -> np.ndarray:
    """The array of one ``.npy`` member, read without trusting its header: the data is read in
    chunks as it arrives and must be exactly as long as the header says, so a header that claims
    more than the member holds allocates nothing beyond what the member holds."""
    where = f"npz file {path!r}: {key}"
    try:
        with archive.open(member) as stream:
            try:
                version = np.lib.format.read_magic(stream)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = header(stream)
            except (ValueError, EOFError, SyntaxError) as error:
                raise DataError(f"{where} is not a .npy array ({error}); expected arrays written by "
                                "numpy.savez") from None
            if dtype.hasobject:
                raise DataError(f"{where} holds Python objects (a pickle), which are never loaded; "
                                "expected a numeric array")
            expected = math.prod(shape) * dtype.itemsize
            data = bytearray()
            while len(data) <= expected and (chunk := stream.read(min(_CHUNK, expected + 1 - len(data)))):
                data.extend(chunk)
    except DataError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as error:
        raise DataError(f"{where} cannot be read ({error})") from None
    if len(data) != expected:
        raise DataError(f"{where}: its header claims shape {shape} of {dtype} ({expected} bytes) but the "
                        f"member holds {len(data)}{'+' if len(data) > expected else ''} bytes of data; "
                        "the file is truncated or corrupt")
    values = np.frombuffer(data, dtype=dtype)
    return values.reshape(shape, order="F" if fortran_order else "C")


def _split(path: str, split: str, images: np.ndarray, labels: np.ndarray) -> ImageArrays:
    """Validate one split of an ``npz`` file and convert it to :class:`ImageArrays`."""
    x, y = f"x_{split}", f"y_{split}"
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] not in (1, 3)
                                     and images.shape[3] not in (1, 3)):
        raise DataError(f"npz file {path!r}: {x} has shape {images.shape}; expected {_EXPECTED_IMAGES}")
    if len(images) == 0:
        raise DataError(f"npz file {path!r}: {x} holds no images; expected at least one")
    if images.size == 0:
        raise DataError(f"npz file {path!r}: {x} has shape {images.shape}, images without pixels; "
                        f"expected {_EXPECTED_IMAGES} with H, W >= 1")
    images = _as_pixels(path, x, images)
    if labels.dtype.kind not in "iu" or labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(f"npz file {path!r}: {y} has dtype {labels.dtype} and shape {labels.shape}; "
                        "expected integer labels of shape (N,)")
    labels = labels.reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"npz file {path!r}: {x} has {len(images)} images but {y} has {len(labels)} labels; "
                        "expected one label per image")
    low, high = int(labels.min()), int(labels.max())  # Python ints: a uint64 label must not wrap when cast
    if low < 0 or high >= 2**31:
        raise DataError(f"npz file {path!r}: {y} has label {low if low < 0 else high}; expected labels in "
                        "[0, classes)")
    return ImageArrays(to_nchw(images), labels.astype(np.int64))


def _as_pixels(path: str, key: str, images: np.ndarray) -> np.ndarray:
    """uint8 pixels: uint8 as is; other integer or float values must lie in [0, 255]."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iuf":
        raise DataError(f"npz file {path!r}: {key} has dtype {images.dtype}; expected uint8 pixel values "
                        "in 0..255 (or numbers in [0, 255])")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(f"npz file {path!r}: {key} has NaN or infinite values; expected pixel values in [0, 255]")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise DataError(f"npz file {path!r}: {key} has values in [{low:g}, {high:g}]; expected pixel values "
                        "in [0, 255] (scale them, e.g. multiply [0, 1] images by 255)")
    if images.dtype.kind == "f" and high <= 1.0:
        raise DataError(f"npz file {path!r}: {key} holds floats in [{low:g}, {high:g}]; expected pixel values "
                        "in [0, 255] (multiply images scaled to [0, 1] by 255, or save them as uint8)")
    return np.rint(images).astype(np.uint8)


def _describe(images: np.ndarray) -> str:
    _, channels, height, width = images.shape
    return f"{height}x{width} with {channels} channel(s)"
