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
import math

import numpy as np
from flwr.app import Array

_NUMPY_STYPE = "numpy.ndarray"
_HEADER_PREFIX = 4096  # a .npy header is a few hundred bytes unless the shape is absurd


def array_view(array: Array) -> np.ndarray:
    """The values of ``array`` as a read-only NumPy view of its bytes (no copy)."""
    if array.stype != _NUMPY_STYPE:
        return array.numpy()
    data = array.data
    head = io.BytesIO(data[:_HEADER_PREFIX])
    try:
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(head)
    except (ValueError, EOFError):  # a long header, or not .npy: Flower's reader decides
        return array.numpy()
    count = math.prod(shape)
    offset = head.tell()
    if fortran_order or dtype.hasobject or len(data) != offset + count * dtype.itemsize:
        return array.numpy()  # Flower's reader raises for truncated or padded data
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


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
