"""Merge of partial parameter sets into the global state.

Each global key becomes the weighted mean of its values over the updates that
contain it; keys no update contains are returned as the very same arrays
(bit-identical, not copied). Works on name -> NumPy array mappings, which is
what Flower carries; nothing here imports Flower.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

WEIGHTINGS = ("examples", "uniform")
"""``examples``: weight each update by its number of training examples (FedAvg
style); ``uniform``: a plain mean over holders (the official ResIST code)."""


def update_weights(num_examples: Sequence[int], weighting: str) -> list[float]:
    """Merge weights of updates under ``weighting`` (one of :data:`WEIGHTINGS`)."""
    if weighting == "examples":
        return [float(n) for n in num_examples]
    if weighting == "uniform":
        return [1.0] * len(num_examples)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def merge_partial(global_state: Mapping[str, np.ndarray],
                  updates: Sequence[Mapping[str, np.ndarray]],
                  weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Merge partial updates into ``global_state``.

    Parameters
    ----------
    global_state : mapping of str to ndarray
        The current global parameters.
    updates : sequence of mappings of str to ndarray
        Each holds a subset of the global keys with arrays of the same shape.
    weights : sequence of float
        One positive finite weight per update.

    Returns
    -------
    dict of str to ndarray
        The new global state, in the order of ``global_state``: for every key,
        the weighted mean over the updates holding it (cast back to the global
        dtype; integer buffers are rounded), or the unchanged global array.
    """
    if len(updates) != len(weights):
        raise ValueError(f"got {len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if w.size and (not np.all(np.isfinite(w)) or np.any(w <= 0)):
        raise ValueError(f"weights must be positive and finite, got {weights}")
    for i, update in enumerate(updates):
        if unknown := sorted(set(update) - set(global_state)):
            raise ValueError(f"update {i} has keys not in the global state: {unknown[:5]}")
    merged: dict[str, np.ndarray] = {}
    threads = torch.get_num_threads()
    # The merge is memory-bound: one thread is as fast as several on an idle machine and
    # far faster when the cores are shared (e.g. with simulated clients on the same host).
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # Arrays decoded from Flower records are read-only; they are only read here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for key, current in global_state.items():
                holders = [(u[key], wi) for u, wi in zip(updates, w) if key in u]
                merged[key] = current if not holders else _weighted_mean(key, current, holders)
    finally:
        torch.set_num_threads(threads)
    return merged


def _weighted_mean(key: str, current: np.ndarray, holders: list[tuple[np.ndarray, float]]) -> np.ndarray:
    total = sum(wi for _, wi in holders)
    # float32/float64 accumulate in their own precision; half and integer
    # buffers in float64, then cast back (integers rounded). torch's fused
    # add-with-alpha reads each update once and writes nothing else.
    acc_dtype = current.dtype if current.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    acc: torch.Tensor | None = None
    for value, wi in holders:
        if value.shape != current.shape:
            raise ValueError(f"{key}: update has shape {value.shape}, expected {current.shape}")
        t = torch.from_numpy(np.require(value, dtype=acc_dtype, requirements="C"))
        if acc is None:
            acc = torch.mul(t, wi / total)
        else:
            acc.add_(t, alpha=wi / total)
    out = acc.numpy()
    return out if acc_dtype == current.dtype else cast_mean(out, current.dtype)


def cast_mean(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A float mean cast back to a parameter's ``dtype`` without overflow.

    Integer and bool means are rounded and saturate at the dtype's range: a
    mean of in-range integers is in range, but float64 rounding can carry it
    past the bound (``2**63 - 1`` becomes ``2.0**63``), where a plain cast wraps
    to ``-2**63``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iub":
        with np.errstate(over="ignore"):
            return mean.astype(dtype, copy=False)
    low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    rounded = np.rint(mean)
    inside = (rounded > float(low)) & (rounded < float(high))
    out = np.where(rounded >= float(high), np.array(high, dtype), np.array(low, dtype))
    out[inside] = rounded[inside].astype(dtype)
    return out.astype(dtype, copy=False)


def check_server_lr(server_lr: float) -> None:
    """Raise ValueError unless ``server_lr`` is a positive number."""
    if not server_lr > 0:
        raise ValueError(f"server_lr = {server_lr!r}: expected a positive number")


def server_step(current: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray],
                server_lr: float) -> dict[str, np.ndarray]:
    """Move the global model only ``server_lr`` of the way to the merged one.

    ``new = current + server_lr * (merged - current)`` for every floating-point key
    (``server_lr = 1`` returns ``merged`` itself: the plain merge). Integer buffers
    (BatchNorm's ``num_batches_tracked``) take the merged value. A server step below
    1 damps a round in which one node's update went far off.
    """
    check_server_lr(server_lr)
    if server_lr == 1.0:
        return dict(merged)
    out = {}
    for key, new in merged.items():
        old = current[key]
        if new.dtype.kind != "f" or new is old:
            out[key] = new
            continue
        step = old.astype(np.float64) + server_lr * (new.astype(np.float64) - old.astype(np.float64))
        out[key] = step.astype(new.dtype)
    return out
