"""Checks on a client's training reply before it may touch the global model.

Pure NumPy: a reply is merged only if it carries exactly the keys its node was
sent, each with the sent shape and a compatible dtype, all values finite, and
a positive integer example count not above a cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds", "local-steps")
"""The MetricRecord keys of a training reply (what the ClientApp sends)."""
EVALUATE_METRICS = ("num-examples", "eval-loss", "eval-acc")
"""The MetricRecord keys of a federated-evaluation reply."""


class ReplyError(ValueError):
    """A training reply that must be dropped; the message says why."""


def check_update(update: Mapping[str, np.ndarray],
                 sent: Mapping[str, tuple[tuple[int, ...], np.dtype | str]]) -> None:
    """Raise :class:`ReplyError` unless ``update`` matches what was ``sent``.

    ``sent`` maps every key the node was sent to its ``(shape, dtype)``.
    """
    if missing := [k for k in sent if k not in update]:
        raise ReplyError(f"missing {len(missing)} key(s) it was sent, e.g. {missing[:3]}")
    if extra := [k for k in update if k not in sent]:
        raise ReplyError(f"{len(extra)} key(s) it was not sent, e.g. {extra[:3]}")
    for key, value in update.items():
        shape, dtype = sent[key]
        if value.shape != tuple(shape):
            raise ReplyError(f"{key} has shape {value.shape}, expected {tuple(shape)}")
        if _kind(value.dtype) != _kind(np.dtype(dtype)):
            raise ReplyError(f"{key} has dtype {value.dtype}, expected {dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ReplyError(f"{key} has non-finite values (NaN or Inf)")


def check_num_examples(value: Any, cap: int) -> int:
    """The reply's ``num-examples`` as an int in [1, cap], else :class:`ReplyError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ReplyError(f"num-examples = {value!r} is not an integer")
    if not 1 <= value <= cap:
        raise ReplyError(f"num-examples = {value} is outside [1, {cap}]")
    return int(value)


def check_finite_number(name: str, value: Any) -> float | int:
    """``value`` if it is a finite int or float (not a bool), else :class:`ReplyError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ReplyError(f"{name} = {value!r} is not a finite number")
    return value


def _kind(dtype: np.dtype) -> str:
    """float, signed/unsigned integer and bool families; widths may differ."""
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(dtype.kind, dtype.str)
