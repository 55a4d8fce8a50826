"""Strict reading of one array from the bytes of a ``.npy`` file, bounded by those bytes.

Flower carries every array as the bytes of a ``.npy`` file (``Array.data`` in the Message API,
``Parameters.tensors`` in the legacy API). ``np.load`` trusts the header: a header that claims
1 TiB makes it allocate 1 TiB before it finds the data short. :func:`read_npy` reads the header
first and refuses anything whose header and length disagree, before allocating: the array it
returns is a read-only view of ``data`` (no copy), so decoding never costs more memory than the
bytes received. Pure NumPy; every refusal is a :class:`NpyError` saying what was wrong.
"""

from __future__ import annotations

import io
import math

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
"""The first bytes of every ``.npy`` file."""
HEADER_PREFIX = 16384
"""Bytes of ``data`` parsed for the header (NumPy itself refuses headers past 10,000 bytes)."""


class NpyError(ValueError):
    """Bytes that are not one valid ``.npy`` array; the message says why."""


def is_npy(data: bytes | memoryview) -> bool:
    """True if ``data`` starts like a ``.npy`` file."""
    return bytes(data[:len(NPY_MAGIC)]) == NPY_MAGIC


def read_npy(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The array stored in ``data`` (a read-only view), or :class:`NpyError`.

    Refused: anything that is not ``bytes``-like, an empty or truncated file, a bad magic or
    header, object (pickled) dtypes, and a length that differs from what the header's shape and
    dtype need (checked before any allocation).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise NpyError(f"expected the bytes of a .npy file, got {type(data).__name__}")
    if len(data) == 0:
        raise NpyError("empty (0 bytes); expected the bytes of a .npy file")
    if not is_npy(data):
        raise NpyError(f"not a .npy file (starts with {bytes(data[:8])!r}, expected {NPY_MAGIC!r})")
    head = io.BytesIO(bytes(data[:HEADER_PREFIX]))
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            raise NpyError(f".npy format version {version} is not supported (expected 1.0 or 2.0)")
    except NpyError:
        raise
    except Exception as err:  # noqa: BLE001 - NumPy raises ValueError/EOFError/SyntaxError for bad headers
        raise NpyError(f"the .npy header cannot be read ({type(err).__name__}: {err})") from None
    if dtype.hasobject:
        raise NpyError(f"dtype {dtype} holds Python objects (a pickle), which are never loaded")
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise NpyError(f"the header's shape {shape} is not a tuple of non-negative integers")
    count = math.prod(shape)
    offset = head.tell()
    needed = offset + count * dtype.itemsize  # Python ints: no overflow whatever the header claims
    if len(data) != needed:
        raise NpyError(f"the header claims shape {shape} of {dtype} ({count * dtype.itemsize} bytes of data) "
                       f"but {len(data) - offset} bytes follow it")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(shape, order="F" if fortran_order else "C")
