"""Width-sliced sub-models of the pre-activation ResNets: what HeteroFL, FedRolex and FjORD train.

A sub-model of width rate r keeps, of every layer, an index set of its output channels (and the
matching input channels of the next layer); the classifier keeps every class. Its ``state_dict``
has the global model's names with sliced shapes: it is the model of the same spec with
``base_width`` scaled (:func:`sliced_spec`), so a client builds it directly, never the full model.

The channels of a :class:`~resist_fl.core.preact_resnet.PreActResNet` fall into *channel groups*
(:func:`channel_groups`): the trunk of each stage (``trunk1`` .. ``trunk4``; the stem writes
``trunk1``, and identity shortcuts tie every block of a stage to its trunk) and the inner channels
of each block (``layer3.2.inner``: between its two convolutions). An index set per group
(:func:`prefix_indices` for HeteroFL / FjORD, :func:`rolling_indices` for FedRolex) determines
the slice of every tensor (:func:`key_groups`, :func:`slice_state`). :func:`merge_sliced` is
HeteroFL's rule: every element of every global tensor becomes the weighted mean over the
sub-models that held it; elements nobody held are unchanged.

Pure NumPy on name -> array mappings; nothing imports Flower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from resist_fl.core.aggregation import cast_mean
from resist_fl.core.model import ModelSpec
from resist_fl.core.preact_resnet import stage_widths, widths_of

IndexSets = Mapping[str, np.ndarray]
"""Channel group -> sorted kept channel indices."""

_BLOCK = re.compile(r"^layer(?P<stage>[1-4])\.(?P<index>\d+)\.(?P<rest>.+)$")


def check_rate(rate: float) -> float:
    """``rate`` as a float in (0, 1], else ValueError."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(f"width rate = {rate!r}: expected a number in (0, 1]")
    return float(rate)


def sliced_spec(spec: ModelSpec, rate: float) -> ModelSpec:
    """The spec of the width-``rate`` sub-model, by HeteroFL's per-layer rule: every stage keeps
    ``ceil(rate x C)`` of its ``C`` channels (``src/models/resnet.py`` line 164 of dem123456789's HeteroFL code
    at ea528c3, ``int(np.ceil(model_rate * x))`` for each stage's hidden size). Where those counts keep the
    stages' ratios (every rate :func:`actual_rate` gives) it is the model of the same spec at a smaller
    ``base_width``; otherwise the spec names its ``stage_widths``."""
    if spec.arch != "preact":
        raise ValueError(f"width slicing is defined for the pre-activation family, not {spec.arch!r}")
    rate = check_rate(rate)
    kept = tuple(max(1, math.ceil(rate * c - 1e-9)) for c in widths(spec))  # (a rate k / C gives k exactly)
    if kept == stage_widths(kept[0]):
        return replace(spec, base_width=kept[0], stage_widths=())
    return replace(spec, base_width=kept[0], stage_widths=kept)


def whole_channels(rate: float, base_width: int) -> float:
    """``rate`` rounded to a whole number of first-stage channels (at least 1), the later stages in the
    model's ratios: what a rate of a ``width-rates`` list and FjORD's levels give."""
    return max(1, round(check_rate(rate) * base_width)) / base_width


def actual_rate(spec: ModelSpec, rate: float) -> float:
    """:func:`whole_channels` of ``spec``'s first stage."""
    return whole_channels(rate, spec.base_width)


def layer_rates(base_width: int) -> tuple[float, ...]:
    """``width-rates='layers'``: every width of HeteroFL's per-layer rule (:func:`sliced_spec`) for a model
    of ``base_width``, largest first: ``k / C`` for each channel count ``k`` of the widest stage (``C``
    channels), which steps every narrower stage through all of its counts too."""
    widest = max(stage_widths(base_width))
    return tuple(k / widest for k in range(widest, 0, -1))


def widths(spec: ModelSpec) -> tuple[int, ...]:
    """Channels of the four stages."""
    return widths_of(spec)


def channel_groups(spec: ModelSpec) -> dict[str, int]:
    """Every channel group of ``spec``'s model and its size."""
    width = widths(spec)
    groups = {f"trunk{s + 1}": width[s] for s in range(4)}
    for s, depth in enumerate(spec.depths):
        for i in range(depth):
            groups[f"layer{s + 1}.{i}.inner"] = width[s]
    return groups


def key_groups(spec: ModelSpec, keys: Sequence[str]) -> dict[str, tuple[str | None, ...]]:
    """For every ``state_dict`` key, the channel group of each of its leading sliced dimensions
    (``None``: not sliced, e.g. the image channels or the classes); ``()`` for scalars."""
    out: dict[str, tuple[str | None, ...]] = {}
    for key in keys:
        name = key.rsplit(".", 1)[-1]
        if key == "conv1.weight":
            out[key] = ("trunk1", None)
        elif key.startswith("stem."):
            out[key] = () if name == "num_batches_tracked" else ("trunk1",)
        elif key.startswith("head_norm."):
            out[key] = () if name == "num_batches_tracked" else ("trunk4",)
        elif key == "linear.weight":
            out[key] = (None, "trunk4")
        elif key == "linear.bias":
            out[key] = (None,)
        elif match := _BLOCK.match(key):
            stage, index, rest = int(match["stage"]), int(match["index"]), match["rest"]
            trunk = f"trunk{stage}"
            block_in = f"trunk{stage - 1}" if index == 0 and stage > 1 else trunk
            inner = f"layer{stage}.{index}.inner"
            layer = rest.split(".", 1)[0]
            if rest == "residual_scale" or name == "num_batches_tracked":
                out[key] = ()
            elif layer == "bn1":
                out[key] = (block_in,)
            elif layer == "conv1":
                out[key] = (inner, block_in)
            elif layer == "bn2":
                out[key] = (inner,)
            elif layer == "conv2":
                out[key] = (trunk, inner)
            elif layer == "shortcut":
                out[key] = (trunk, block_in)
            else:
                raise ValueError(f"{key}: not a key of the pre-activation family")
        else:
            raise ValueError(f"{key}: not a key of the pre-activation family")
    return out


def prefix_indices(spec: ModelSpec, rate: float) -> dict[str, np.ndarray]:
    """HeteroFL's and FjORD's index sets: the first ``r * C`` channels of every group."""
    small = channel_groups(sliced_spec(spec, rate))
    return {group: np.arange(small[group]) for group in channel_groups(spec)}


def rolling_indices(spec: ModelSpec, rate: float, server_round: int) -> dict[str, np.ndarray]:
    """FedRolex's index sets: a window of ``r * C`` channels of every group whose start advances
    by one channel each round (wrapping around), so every channel is trained over time."""
    full, small = channel_groups(spec), channel_groups(sliced_spec(spec, rate))
    return {group: np.sort((int(server_round) + np.arange(small[group])) % size) for group, size in full.items()}


def overlapping_windows(spec: ModelSpec, rates: Sequence[float], overlap: float,
                        rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """FedRolex's ``overlap`` option, one index set per node of the round in order (its code,
    ``resnet_server.py`` lines 98-110 of AIoT-MLSys-Lab/FedRolex): every channel group gets a random
    permutation for the round; each node in turn advances the group's offset by
    ``floor(L x (1 - overlap)) + 1`` modulo ``L`` (its own window size ``L``) and keeps ``L`` channels of
    the permutation rolled by that offset, so the nodes of one round get shifted windows."""
    if not 0 <= overlap <= 1:
        raise ValueError(f"fedrolex-overlap = {overlap!r}: expected a number in [0, 1]")
    full = channel_groups(spec)
    permutation = {group: rng.permutation(size) for group, size in full.items()}
    offset = dict.fromkeys(full, 0)
    windows = []
    for rate in rates:
        small = channel_groups(sliced_spec(spec, rate))
        kept = {}
        for group, size in small.items():
            offset[group] = (offset[group] + int(size * (1 - overlap)) + 1) % size
            kept[group] = np.sort(np.roll(permutation[group], offset[group])[:size])
        windows.append(kept)
    return windows


def slice_state(state: Mapping[str, np.ndarray], groups: Mapping[str, tuple[str | None, ...]],
                indices: IndexSets) -> dict[str, np.ndarray]:
    """Every array of ``state`` cut to the index sets (the sub-model's ``state_dict``, global names)."""
    out = {}
    for key, value in state.items():
        cut = np.asarray(value)
        for axis, group in enumerate(groups[key]):
            if group is not None:
                cut = np.take(cut, indices[group], axis=axis)
        out[key] = np.require(cut, requirements="C")  # (ascontiguousarray would make scalars 1-d)
    return out


def element_index(shape: tuple[int, ...], groups: tuple[str | None, ...], indices: IndexSets) -> tuple:
    """The ``np.ix_`` index of the elements a sliced tensor of global ``shape`` holds."""
    if not groups:
        return ()
    axes = [np.arange(shape[d]) if g is None else indices[g] for d, g in enumerate(groups)]
    axes += [np.arange(n) for n in shape[len(groups):]]
    return np.ix_(*axes)


def merge_sliced(global_state: Mapping[str, np.ndarray], updates: Sequence[tuple[Mapping[str, np.ndarray], IndexSets]],
                 groups: Mapping[str, tuple[str | None, ...]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """HeteroFL's merge: every element of every global tensor becomes the weighted mean of its
    values over the updates whose index sets held it; untouched elements (and keys no update
    holds) are the global ones. Integer buffers are rounded (:func:`~resist_fl.core.aggregation.cast_mean`)."""
    if len(updates) != len(weights):
        raise ValueError(f"got {len(updates)} updates but {len(weights)} weights")
    merged: dict[str, np.ndarray] = {}
    for key, current in global_state.items():
        holders = [(u[key], idx, float(w)) for (u, idx), w in zip(updates, weights) if key in u]
        if not holders:
            merged[key] = current
            continue
        total = np.zeros(current.shape, np.float64)
        weight = np.zeros(current.shape, np.float64)
        for value, idx, w in holders:
            where = element_index(current.shape, groups[key], idx)
            if not where:  # a scalar
                total += w * value
                weight += w
                continue
            total[where] += w * np.asarray(value, np.float64)
            weight[where] += w
        held = weight > 0
        mean = np.where(held, total / np.where(held, weight, 1.0), current.astype(np.float64))
        merged[key] = cast_mean(mean, current.dtype) if current.dtype.kind in "iub" else \
            mean.astype(current.dtype)
    return merged
