"""A node-local on-disk cache of decoded training partitions.

Decoding a partition (PNG images from the hub, an ``.npz`` file, the synthetic generator) and
splitting it with flwr-datasets costs seconds and imports the Hugging Face stack; a deployed
SuperNode pays that in every new ClientApp process. The cache stores each partition once as two
``.npy`` files (uint8 NCHW images, int64 labels) and later processes memory-map them.

An entry's name is a hash of everything that determines its contents: the data set, the
partitioning settings, the source file's size and modification time (``npz``), and the source
code of the data package (so a change to how data are made or split never reads a stale entry).
Entries are written to a temporary name and renamed into place, so concurrent nodes on one host
never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from resist_fl.data.arrays import ImageArrays
from resist_fl.data.idx import IDX_DATASETS, idx_file_stamps

_FORMAT = 1
_SOURCES = ("arrays.py", "digits.py", "hub.py", "idx.py", "imagefolder.py", "npz.py", "partitioning.py",
            "sources.py", "synthetic.py")


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for name in _SOURCES:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:16]


def partition_key(dataset: str, data_path: str, **settings: object) -> str:
    """The entry name of a partition: a hash of the data set, its source and ``settings``."""
    source: dict[str, object] = {"dataset": dataset, "data-path": data_path}
    if dataset in IDX_DATASETS:  # the IDX files it is read from: their sizes and times
        source.update(files=idx_file_stamps(dataset, data_path))
    elif data_path and os.path.isdir(data_path):  # an image directory: its class folders' times
        from resist_fl.data.imagefolder import imagefolder_source_key

        source.update(folders=imagefolder_source_key(data_path, 0)[2])
    elif data_path and os.path.exists(data_path):
        stat = os.stat(data_path)
        source.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    blob = json.dumps({"format": _FORMAT, "code": _code_fingerprint(), "source": source, **settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_partition(cache_dir: str, key: str, load: Callable[[], ImageArrays]) -> ImageArrays:
    """The partition stored under ``key`` in ``cache_dir``, or ``load()``'s result, stored there.

    ``cache_dir = ''`` turns the cache off (``load()`` every time). The returned images are
    memory-mapped read-only when they come from the cache.
    """
    if not cache_dir:
        return load()
    entry = Path(cache_dir).expanduser() / key
    images_file, labels_file = entry / "images.npy", entry / "labels.npy"
    if images_file.exists() and labels_file.exists():
        try:
            return ImageArrays(np.load(images_file, mmap_mode="r"), np.load(labels_file))
        except (OSError, ValueError):  # a damaged entry: decode again and replace it
            pass
    arrays = load()
    try:
        entry.mkdir(parents=True, exist_ok=True)
        for path, array in ((images_file, arrays.images), (labels_file, arrays.labels)):
            with tempfile.NamedTemporaryFile(dir=entry, suffix=".npy.tmp", delete=False) as handle:
                np.save(handle, np.ascontiguousarray(array))
            os.replace(handle.name, path)
    except OSError:  # a read-only or full disk: train without the cache
        pass
    return arrays
