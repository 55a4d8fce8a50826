"""Capacity-aware decomposition: how many blocks each node gets, and which.

A node may train only part of the partitionable blocks in a round: its *capacity* c in (0, 1]
allows at most ``max(1, floor(c * P))`` of the P blocks (:func:`resist_fl.core.model_cost.max_depth`).
Given every sampled node's maximum, :func:`allocate_depths` chooses each node's depth under an allocation policy
(:data:`ALLOCATIONS`) and :func:`deal_blocks` deals the blocks into groups of those depths:

- no group exceeds its node's maximum, and no group holds a block twice;
- every block is held by some group whenever the maxima allow it (their sum is at least P);
  otherwise as many blocks as the maxima allow are held and the rest are reported untrained;
- the minimum depth m is kept where it fits (``min(m, maximum)``);
- with equal capacities of 1 and ``uniform`` allocation the depths and the dealing are exactly
  those of :func:`resist_fl.core.decomposition.sample_subnetworks` (same draws, same groups).

Everything here is pure NumPy on block names; nothing imports Flower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALLOCATIONS = ("uniform", "capacity", "speed")
"""``uniform``: equal depths (today's ResIST), capped by each node's maximum, the rest spread over
the others; ``capacity``: depth in proportion to each node's capacity; ``speed``: depth in
proportion to each node's measured blocks per second (from earlier rounds), bounded relative to
the median (:data:`SPEED_WEIGHT_BOUND`)."""


SPEED_WEIGHT_BOUND = 4.0
"""``speed`` allocation: a node's speed weight is clipped to within this factor of the round's
median speed (:func:`bounded_weights`), so a node that claims (or is measured at) an extreme speed
gets at most 4x the median node's share of the blocks, and no node less than 1/4 of it."""


@dataclass(frozen=True)
class Decomposition:
    """One round's sub-networks: a group of blocks per node, and the blocks nobody holds."""

    groups: list[tuple[str, ...]]
    untrained: tuple[str, ...]
    num_blocks: int
    whole: bool = False
    """Every node the whole model, sent as FedAvg sends it (a warm-up round: :class:`resist_fl.core.dealing.Warmup`)."""

    @property
    def held_fraction(self) -> float:
        """Mean fraction of the partitionable blocks a sub-network holds (the inference scale)."""
        return sum(len(g) for g in self.groups) / (len(self.groups) * self.num_blocks)


def check_capacity(capacity: float, what: str = "capacity") -> float:
    """``capacity`` as a float in (0, 1], else ValueError naming it."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 1:
        raise ValueError(f"{what} = {capacity!r}: expected a number in (0, 1] (the fraction of the "
                         "partitionable blocks a node can train in a round)")
    return float(capacity)


def allocate_depths(num_blocks: int, maxima: Sequence[int], weights: Sequence[float] | None = None,
                    min_blocks: int = 0, copies: int = 1) -> list[int]:
    """Depth of each node: in proportion to ``weights`` (equal when None), within the maxima.

    Total in its weights: any values are made usable first (:func:`sane_weights`).

    ``copies`` > 1 (``privacy-min-holders``): the depths sum to ``copies * num_blocks`` instead, so
    :func:`deal_blocks`' windows go round the cycle ``copies`` times and every block is held by at
    least ``copies`` nodes whenever the maxima allow it.

    The depths sum to ``num_blocks`` when the maxima allow it (a node whose proportional share
    exceeds its maximum gets its maximum and the rest is shared by the others, in proportion
    again), else every node gets its maximum. Shares are rounded by largest remainder (ties to
    the earlier node); every node gets at least one block, and at least ``min(min_blocks,
    maximum)``.
    """
    count = len(maxima)
    if count == 0:
        return []
    if num_blocks < 1:
        raise ValueError("there are no partitionable blocks")
    if any(m < 1 for m in maxima):
        raise ValueError(f"maximum depths must be >= 1, got {list(maxima)}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies = {copies!r}: expected a whole number >= 1")
    weights = sane_weights(weights, count)
    maxima = [min(int(m), num_blocks) for m in maxima]
    total = copies * num_blocks
    if sum(maxima) <= total:
        depths = list(maxima)
    else:
        depths = _proportional(total, maxima, weights)
    return [max(d, 1, min(min_blocks, m)) for d, m in zip(depths, maxima)]


def sane_weights(weights: Sequence[object] | None, count: int) -> list[float]:
    """``count`` positive finite weights of at most 1, for any input (never raises).

    A weight that is not a real number, not finite or not positive (or missing, when fewer than
    ``count`` are given) is replaced by the median of the valid ones (1.0 if none is valid);
    then all are divided by the largest, so sums cannot overflow, and a weight that underflows
    to 0 is raised to the smallest positive float. ``None``: equal weights.
    """
    if weights is None:
        return [1.0] * count
    try:
        raw = [] if isinstance(weights, (str, bytes)) else list(weights)[:count]
    except TypeError:  # not iterable
        raw = []
    valid = [float(w) if _is_weight(w) else math.nan for w in raw]
    valid += [math.nan] * (count - len(valid))
    top = max((w for w in valid if not math.isnan(w)), default=1.0)
    scaled = [w if math.isnan(w) else max(w / top, _TINY) for w in valid]  # in (0, 1]: sums stay finite
    good = [w for w in scaled if not math.isnan(w)]
    fill = float(np.median(good)) if good else 1.0
    return [fill if math.isnan(w) else w for w in scaled]


_TINY = float(np.finfo(float).tiny)


def _is_weight(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        number = float(value)
    except OverflowError:  # a Python int beyond float: treat as not a weight
        return False
    return math.isfinite(number) and number > 0


def bounded_weights(weights: Sequence[object], bound: float = SPEED_WEIGHT_BOUND) -> list[float]:
    """:func:`sane_weights`, then each clipped to ``[median / bound, median * bound]``.

    So no single weight, however extreme its claim, is more than ``bound`` times the round's
    median weight, nor less than ``1 / bound`` of it: a node's proportional share of the blocks is
    at most ``bound`` times (and at least ``1 / bound`` of) the median node's.
    """
    if not bound >= 1:
        raise ValueError(f"bound = {bound!r}: expected a number >= 1")
    sane = sane_weights(weights, len(list(weights)))
    if not sane:
        return []
    median = float(np.median(sane))
    return [min(max(w, median / bound), median * bound) for w in sane]


def _proportional(total: int, maxima: list[int], weights: list[float]) -> list[int]:
    """Integers summing to ``total`` in proportion to ``weights``, none above its maximum."""
    count = len(maxima)
    shares = [0.0] * count
    free = list(range(count))
    remaining = float(total)
    while free:  # water-filling: fix the nodes whose share exceeds their maximum, share the rest
        weight = sum(weights[i] for i in free)
        over = [i for i in free if remaining * weights[i] / weight > maxima[i]]
        if not over:
            for i in free:
                shares[i] = remaining * weights[i] / weight
            break
        for i in over:
            shares[i] = float(maxima[i])
            remaining -= maxima[i]
        free = [i for i in free if i not in over]
    depths = [min(math.floor(s + 1e-9), maxima[i]) for i, s in enumerate(shares)]
    short = total - sum(depths)
    by_remainder = sorted(range(count), key=lambda i: (-(shares[i] - depths[i]), i))
    for i in by_remainder:
        if short == 0:
            break
        if depths[i] < maxima[i]:
            depths[i] += 1
            short -= 1
    return depths


def deal_blocks(blocks: Sequence[str], depths: Sequence[int], rng: np.random.Generator) -> Decomposition:
    """Deal ``blocks`` into groups of ``depths`` blocks: consecutive windows of one random cyclic
    order of the blocks, each group returned in forward order.

    A window is never longer than the cycle, so no group holds a block twice; when the depths sum
    to at least the number of blocks the windows cover the cycle, so every block is held; else the
    blocks past the last window are untrained.
    """
    num_blocks = len(blocks)
    if len(set(blocks)) != num_blocks:
        raise ValueError("block names must be distinct")
    if any(not 1 <= d <= num_blocks for d in depths):
        raise ValueError(f"depths must be in [1, {num_blocks}], got {list(depths)}")
    order = rng.permutation(num_blocks)
    starts = np.cumsum([0, *depths[:-1]])
    groups = [tuple(blocks[i] for i in sorted(order[(start + np.arange(d)) % num_blocks]))
              for start, d in zip(starts, depths)]
    uncovered = set(order[min(num_blocks, int(sum(depths))):].tolist())
    untrained = tuple(b for i, b in enumerate(blocks) if i in uncovered)
    return Decomposition(groups, untrained, num_blocks)


def prefix_blocks(blocks: Sequence[str], maxima: Sequence[int]) -> Decomposition:
    """Static depth prefix: each node holds the first ``maximum`` blocks (its budget's most);
    blocks past the largest maximum are untrained."""
    num_blocks = len(blocks)
    depths = [max(1, min(int(m), num_blocks)) for m in maxima]
    groups = [tuple(blocks[:d]) for d in depths]
    deepest = max(depths, default=0)
    return Decomposition(groups, tuple(blocks[deepest:]), num_blocks)
