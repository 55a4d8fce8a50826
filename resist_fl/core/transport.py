"""Compressed transport of model arrays: what travels between server and nodes.

The global model stays float32 and the server merges in float32; only the copies
that travel are compressed. Every floating-point array is encoded under one of
:data:`TRANSPORT_DTYPES`; integer buffers (BatchNorm's ``num_batches_tracked``)
always travel as they are.

- ``float32``: unchanged (the default).
- ``float16``: half precision; values beyond float16's range saturate at
  ±65504 instead of becoming Inf. Relative error <= 2**-11 in the normal range.
- ``uint8``: per-tensor affine quantisation. An array ``x`` travels as one flat
  ``uint8`` array: 8 header bytes (``low = min(x)`` and ``step = (max(x) -
  min(x)) / 255`` as two float32) followed by ``round((x - low) / step)``, one
  byte per value. Decoding gives ``low + q * step``: the error is at most
  ``step / 2`` per value (plus float32 rounding). The shape is not sent: the
  receiver knows it from the key (the global model, or the node's sub-network).

Nothing here imports Flower. Decoding raises :class:`TransportError` (a
``ValueError``) for anything that is not a valid encoding of the expected array.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TRANSPORT_DTYPES = ("float32", "float16", "uint8")
"""Values of the ``transport-dtype`` run-config key."""

FLOAT16_MAX = float(np.finfo(np.float16).max)
_HEADER = 8  # two float32: low, step


class TransportError(ValueError):
    """An array that does not decode to what was expected."""


def check_transport(transport: str) -> None:
    """Raise ValueError unless ``transport`` is one of :data:`TRANSPORT_DTYPES`."""
    if transport not in TRANSPORT_DTYPES:
        raise ValueError(f"unknown transport dtype {transport!r}; expected one of {', '.join(TRANSPORT_DTYPES)}")


def encode_array(value: np.ndarray, transport: str) -> np.ndarray:
    """``value`` as it travels under ``transport`` (non-float arrays unchanged)."""
    check_transport(transport)
    value = np.asarray(value)
    if transport == "float32" or value.dtype.kind != "f":
        return value
    if transport == "float16":
        with np.errstate(invalid="ignore"):
            return np.asarray(np.clip(value, -FLOAT16_MAX, FLOAT16_MAX), dtype=np.float16)
    flat = value.astype(np.float32, copy=False).ravel()
    low, high = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
    step = (high - low) / 255.0 if high > low else 1.0  # non-finite input gives a non-finite header
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(np.rint((flat - np.float32(low)) / np.float32(step)), 0, 255).astype(np.uint8)
    header = np.array([low, step], dtype=np.float32).view(np.uint8)
    return np.concatenate([header, q])


def decode_array(value: np.ndarray, shape: tuple[int, ...], dtype: np.dtype | str, transport: str) -> np.ndarray:
    """The ``dtype`` array of ``shape`` that ``value`` encodes under ``transport``.

    Raises
    ------
    TransportError
        ``value`` has the wrong dtype or size for an encoding of such an array.
    """
    check_transport(transport)
    dtype, shape = np.dtype(dtype), tuple(shape)
    if not isinstance(value, np.ndarray):
        raise TransportError(f"decodes to a {type(value).__name__}, expected a numpy array")
    if transport == "float32" or dtype.kind != "f":
        return value
    if transport == "float16":
        if value.dtype != np.float16:
            raise TransportError(f"has dtype {value.dtype}, expected float16 (transport-dtype='float16')")
        if value.shape != shape:
            raise TransportError(f"has shape {value.shape}, expected {shape}")
        return value.astype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    if value.dtype != np.uint8 or value.shape != (_HEADER + size,):
        raise TransportError(f"has dtype {value.dtype} and shape {value.shape}, expected uint8 of shape "
                             f"({_HEADER + size},) (transport-dtype='uint8': header + one byte per value)")
    low, step = value[:_HEADER].view(np.float32)
    out = value[_HEADER:].astype(np.float32) * step + low
    return out.reshape(shape).astype(dtype, copy=False)


def decode_state(encoded: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 transport: str) -> dict[str, np.ndarray]:
    """Decode the keys of ``encoded`` that ``expected`` names (shape, dtype); others pass unchanged.

    Raises
    ------
    TransportError
        The message names the key.
    """
    out = {}
    for key, value in encoded.items():
        if key not in expected:
            out[key] = value  # the key check belongs to the caller
            continue
        try:
            out[key] = decode_array(value, *expected[key], transport)
        except TransportError as err:
            raise TransportError(f"{key} {err}") from None
    return out
