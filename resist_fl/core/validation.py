"""Checks on a client's training reply before it may touch the global model.

Pure NumPy: a reply is merged only if it carries exactly the keys its node was
sent, each a real numeric array with the sent shape and a compatible dtype
whose values survive conversion to the global dtype (floats finite, integers
in range), a positive integer example count not above a cap, and finite
non-negative metrics. Every check looks at a value's type before any numeric
call, so no content can raise anything but :class:`ReplyError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds", "local-steps")
"""The MetricRecord keys of a training reply (what the ClientApp sends)."""
CLIENT_COST_METRICS = ("blocks", "peak-memory-mb", "memory-measure", "simulated-seconds", "dp-epsilon",
                       "device-cache-mb", "dp-below-clip", "bf16")
"""Optional keys of a training reply: the partitionable blocks trained, the step loop's peak
memory and how it was measured (:mod:`resist_fl.node.peak_memory`), the seconds of a simulated
slowdown included in ``train-seconds``, under local DP the node's cumulative epsilon, and the MiB of
decoded partitions its process keeps on the training device, and whether it trained in bf16 autocast
(1) or fp32 (0).
Checked like the others when present."""
EVALUATE_METRICS = ("num-examples", "eval-loss", "eval-acc")
"""The MetricRecord keys of a federated-evaluation reply."""
MAX_METRIC = 1e12
"""Largest accepted value of a reported metric (losses, seconds, steps): the
round's sums and means of accepted metrics stay finite."""

_FAMILIES = {"f": "float", "i": "int", "u": "int", "b": "bool"}
"""Real numeric dtype kinds and their family; widths within a family may differ."""


class ReplyError(ValueError):
    """A training reply that must be dropped; the message says why."""


class NonFiniteError(ReplyError):
    """A reply dropped for NaN or Inf values (arrays or metrics): a sign of divergence."""


def check_update(update: Mapping[str, Any],
                 sent: Mapping[str, tuple[tuple[int, ...], np.dtype | str]]) -> dict[str, np.ndarray]:
    """The update in the sent dtypes, or :class:`ReplyError` unless it matches what was ``sent``.

    ``sent`` maps every key the node was sent to its ``(shape, dtype)``. A
    value may come in another width of the same family (float64 for float32,
    int32 for int64): it is converted, and must then still be finite (floats)
    or representable (integers).
    """
    if missing := [k for k in sent if k not in update]:
        raise ReplyError(f"missing {len(missing)} key(s) it was sent, e.g. {missing[:3]}")
    if extra := [k for k in update if k not in sent]:
        raise ReplyError(f"{len(extra)} key(s) it was not sent, e.g. {extra[:3]}")
    converted = {}
    for key, value in update.items():
        shape, dtype = sent[key]
        dtype = np.dtype(dtype)
        if not isinstance(value, np.ndarray):
            raise ReplyError(f"{key} decodes to a {type(value).__name__}, expected a numpy array")
        if value.dtype.kind not in _FAMILIES:
            raise ReplyError(f"{key} has dtype {value.dtype}, expected a real numeric dtype ({dtype})")
        if value.shape != tuple(shape):
            raise ReplyError(f"{key} has shape {value.shape}, expected {tuple(shape)}")
        if _FAMILIES[value.dtype.kind] != _FAMILIES.get(dtype.kind):
            raise ReplyError(f"{key} has dtype {value.dtype}, expected {dtype}")
        converted[key] = _as_dtype(key, value, dtype)
    return converted


def _as_dtype(key: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``value`` converted to ``dtype``, if every value survives the conversion."""
    if dtype.kind in "iu" and value.dtype != dtype and value.size:
        info = np.iinfo(dtype)
        low, high = int(value.min()), int(value.max())  # Python ints: exact for any width
        if low < info.min or high > info.max:
            raise ReplyError(f"{key} has values in [{low}, {high}], outside {dtype}'s range "
                             f"[{info.min}, {info.max}]")
    with np.errstate(over="ignore"):
        out = value if value.dtype == dtype else value.astype(dtype)
    if dtype.kind == "f" and not np.isfinite(out).all():
        raise NonFiniteError(f"{key} has values that are not finite as {dtype} (NaN, Inf, or beyond "
                         f"{dtype}'s range, sent as {value.dtype})")
    return out


def non_finite_keys(state: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of float arrays in ``state`` that hold NaN or Inf."""
    return [k for k, v in state.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]


def check_num_examples(value: Any, cap: int) -> int:
    """The reply's ``num-examples`` as an int in [1, cap], else :class:`ReplyError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ReplyError(f"num-examples = {_short(value)} is not an integer")
    if not 1 <= int(value) <= cap:
        raise ReplyError(f"num-examples = {_short(value)} is outside [1, {cap}]")
    return int(value)


def check_metric(name: str, value: Any, high: float = MAX_METRIC) -> float | int:
    """``value`` if it is an int or float (not a bool) in [0, ``high``], else :class:`ReplyError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplyError(f"{name} = {_short(value)} ({type(value).__name__}) is not a number")
    number = int(value) if isinstance(value, (int, np.integer)) else float(value)
    if isinstance(number, float) and not math.isfinite(number):
        raise NonFiniteError(f"{name} = {number!r} is not finite")
    if not 0 <= number <= high:
        raise ReplyError(f"{name} = {_short(number)} is outside [0, {high:g}]")
    return number


MAX_LABELS = 100_000
"""Most labels a reply may say its node holds (``labels-held``)."""


def check_labels(value: Any) -> tuple[int, ...]:
    """A reply's ``labels-held``: distinct non-negative integers, at most :data:`MAX_LABELS` of them,
    else :class:`ReplyError` (the merge also ignores labels beyond the model's classes)."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LABELS:
        raise ReplyError(f"labels-held = {_short(value)}: expected a list of at most {MAX_LABELS} integers")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in value):
        raise ReplyError(f"labels-held = {_short(value)}: expected non-negative integers")
    if len(set(value)) != len(value):
        raise ReplyError(f"labels-held = {_short(value)}: a label is repeated")
    return tuple(sorted(int(v) for v in value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
