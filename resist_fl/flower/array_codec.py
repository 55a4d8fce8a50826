"""Fast conversion between Flower's :class:`~flwr.app.Array` and NumPy arrays.

An ``Array`` of stype ``numpy.ndarray`` holds the bytes of an ``.npy`` file. Flower's own
``Array.numpy()`` reads them through ``np.load`` (a copy per array, and a slow parse) and
``Array(ndarray)`` writes them through ``np.save`` into a growing buffer; on the server, which
reads every reply's arrays and writes the merged model each round, that is most of a round's
server time for a ResNet-101. :func:`array_view` reads the same bytes as a read-only view (no
copy), :func:`array_of` writes them with one copy; both produce and accept exactly the format
Flower's own methods do, and fall back to them for anything unusual.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from resist_fl.core.npy_bytes import is_npy, read_npy

_NUMPY_STYPE = "numpy.ndarray"


def array_view(array: Array) -> np.ndarray:
    """The values of ``array`` as a read-only NumPy view of its bytes (no copy).

    ``.npy`` bytes are read strictly (:func:`resist_fl.core.npy_bytes.read_npy`: a header that
    disagrees with the length raises :class:`~resist_fl.core.npy_bytes.NpyError` before anything
    is allocated); anything else is left to Flower's own reader.
    """
    if array.stype != _NUMPY_STYPE or not is_npy(array.data):
        return array.numpy()
    return read_npy(array.data)


def array_of(values: np.ndarray) -> Array:
    """An ``Array`` holding ``values`` (the bytes ``Array(values)`` holds), written with one copy."""
    values = np.asarray(values)
    if values.dtype.hasobject:
        return Array(values)  # refused by Flower's writer, with its own message
    values = np.require(values, requirements="C")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join((head.getvalue(), memoryview(values.reshape(-1)).cast("B")))
    return Array(dtype=str(values.dtype), shape=tuple(int(n) for n in values.shape), stype=_NUMPY_STYPE, data=data)


def with_arrays(record: ArrayRecord, arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``record`` (same keys, same order) with the keys of ``arrays`` replaced: a merge's new global
    record; the arrays not in ``arrays`` are the very same ``Array`` objects (not copied)."""
    out = ArrayRecord()
    for key, array in record.items():
        out[key] = array if key not in arrays else array_of(arrays[key])
    return out
