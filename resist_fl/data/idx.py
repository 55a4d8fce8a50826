"""Fashion-MNIST and MNIST from their original IDX files (``dataset='fashion-mnist'`` / ``'mnist'``).

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each gzipped or not) are looked for, in this order:

1. in ``data-path`` itself, when given;
2. in torchvision's layout under ``data-path`` (``FashionMNIST/raw`` or ``MNIST/raw``);
3. in the Debian package's directory (``apt-get install dataset-fashion-mnist`` puts them in
   ``/usr/share/datasets/fashion-mnist``), offline;
4. on the Hugging Face hub (``zalando-datasets/fashion_mnist``, ``ylecun/mnist``) when online.

None there: a :class:`~resist_fl.data.arrays.DataError` listing every place looked at. A file is
read against its header the way the ``.npz`` reader reads arrays: the magic number must be the
IDX code of unsigned bytes with the expected number of dimensions, every dimension must be
positive and within :data:`MAX_ITEMS` / :data:`MAX_SIDE`, and the payload must be exactly what the
header announces — a hostile header is an error, never an allocation of what it claims.
"""

from __future__ import annotations

import functools
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resist_fl.data.arrays import DataError, ImageArrays, arrays_from_hf


@dataclass(frozen=True)
class IdxSource:
    """Where one IDX data set is found."""

    torchvision_dir: str
    debian_dir: str
    hub_id: str


IDX_DATASETS = {
    "fashion-mnist": IdxSource("FashionMNIST/raw", "/usr/share/datasets/fashion-mnist",
                               "zalando-datasets/fashion_mnist"),
    "mnist": IdxSource("MNIST/raw", "/usr/share/datasets/mnist", "ylecun/mnist"),
}
IDX_NUM_CLASSES = 10
IDX_CHANNELS = 1
IDX_IMAGE_SIZE = 28
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
"""IDX magic numbers: unsigned bytes (0x08) in 3 dimensions (images) or 1 (labels)."""
MAX_ITEMS = 10_000_000
MAX_SIDE = 4096


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array an IDX file (gzipped when its name ends in ``.gz``) holds; DataError naming the file
    and what was expected when its header or its size does not fit."""
    opener = gzip.open if path.suffix == ".gz" else open
    dims = (magic & 0xFF)
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * dims)
            if len(header) < 4 + 4 * dims:
                raise DataError(f"{path}: {len(header)} header bytes; expected {4 + 4 * dims} (an IDX file)")
            found = struct.unpack(">I", header[:4])[0]
            if found != magic:
                raise DataError(f"{path}: magic number {found:#010x}; expected {magic:#010x} (unsigned bytes in "
                                f"{dims} dimension{'s' if dims > 1 else ''})")
            shape = struct.unpack(f">{dims}I", header[4:])
            if not 0 < shape[0] <= MAX_ITEMS or any(not 0 < side <= MAX_SIDE for side in shape[1:]):
                raise DataError(f"{path}: header shape {shape}; expected at most {MAX_ITEMS} items of sides in "
                                f"1..{MAX_SIDE}")
            size = int(np.prod(shape))
            payload = f.read(size + 1)  # one byte more: trailing bytes are an error too
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot be read ({err})") from err
    if len(payload) != size:
        found = f"{len(payload)}" if len(payload) < size else f"more than {size}"
        raise DataError(f"{path}: {found} payload bytes; the header {shape} announces {size}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def idx_directory(dataset: str, data_path: str = "") -> Path | None:
    """The first directory holding all four files of ``dataset`` (the module docstring's order), or None."""
    source = IDX_DATASETS[dataset]
    candidates = []
    if data_path:
        root = Path(data_path).expanduser()
        candidates += [root, root / source.torchvision_dir]
    candidates.append(Path(source.debian_dir))
    for directory in candidates:
        if all(_file(directory, name) for names in FILES.values() for name in names):
            return directory
    return None


def _split(directory: Path, split: str) -> ImageArrays:
    images_name, labels_name = FILES[split]
    images = read_idx(_file(directory, images_name), IMAGES_MAGIC)
    labels = read_idx(_file(directory, labels_name), LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} {split} images but {len(labels)} labels; expected as many")
    if labels.max() >= IDX_NUM_CLASSES:
        raise DataError(f"{directory}: {split} label {int(labels.max())}; expected labels in [0, {IDX_NUM_CLASSES})")
    return ImageArrays(np.ascontiguousarray(images[:, None]), labels)


@functools.lru_cache(maxsize=4)
def idx_splits(dataset: str, data_path: str = "") -> tuple[ImageArrays, ImageArrays]:
    """The training and test splits of ``dataset`` (uint8 N x 1 x 28 x 28, int64 labels), read once
    per process from the first place that has them."""
    directory = idx_directory(dataset, data_path)
    if directory is not None:
        return _split(directory, "train"), _split(directory, "test")
    return _hub_splits(dataset, data_path)


def idx_file_stamps(dataset: str, data_path: str = "") -> list[tuple[str, int, int]] | str:
    """(path, size, modification time in ns) of each file ``dataset`` is read from (the hub's id when
    no directory holds them): what a cached partition of it depends on."""
    directory = idx_directory(dataset, data_path)
    if directory is None:
        return IDX_DATASETS[dataset].hub_id
    files = [_file(directory, name) for names in FILES.values() for name in names]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def idx_source_key(dataset: str, data_path: str = "") -> str:
    """What names the contents of ``dataset``'s training set (the directory it is read from)."""
    directory = idx_directory(dataset, data_path)
    return f"idx:{dataset}:{directory if directory is not None else IDX_DATASETS[dataset].hub_id}"


def _hub_splits(dataset: str, data_path: str) -> tuple[ImageArrays, ImageArrays]:
    source = IDX_DATASETS[dataset]
    try:
        import datasets

        loaded = datasets.load_dataset(source.hub_id)
        return tuple(arrays_from_hf(loaded[split], "image", "label") for split in ("train", "test"))
    except Exception as err:  # offline, or the hub changed
        looked = [f"data-path {data_path!r}" if data_path else "data-path (not set)",
                  f"{Path(data_path or '<data-path>') / source.torchvision_dir} (torchvision's layout)",
                  f"{source.debian_dir} (Debian: apt-get install dataset-{dataset})",
                  f"the hub's {source.hub_id} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"]
        raise DataError(f"dataset {dataset!r}: none of the places holds its four IDX files ("
                        f"{', '.join(n + '[.gz]' for names in FILES.values() for n in names)}); looked in: "
                        + "; ".join(looked)) from None
