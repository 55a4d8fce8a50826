"""Who holds what in a round: per parameter, how many nodes' updates its merge aggregates.

A round's *holdings* say, for every node, which parameters (state_dict names) it trains and
returns, and for a width-sliced sub-model which elements of each (an index tuple as
:func:`resist_fl.core.width_slicing.element_index` gives; ``None``: the whole tensor). From them:

- :func:`holder_counts`: per name the number of holders of each element (a 0-d count when every
  holder holds the whole tensor, else an array of the tensor's shape);
- :func:`exposure`: the smallest holder count of anything updated this round and the
  parameter-weighted share of the round's updates (node x element) whose merge aggregates fewer
  than ``k`` nodes: what a server (or anyone who sees the merged model and the previous one)
  learns about fewer than ``k`` nodes' data at once. With ResIST's own settings (one node per
  partitioned block) that share is the blocks' share of every sub-network.

Pure NumPy; nothing imports Flower.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Holding = Mapping[str, Any]
"""name -> ``None`` (the whole tensor) or an index tuple into the tensor (its sliced elements)."""


@dataclass(frozen=True)
class Exposure:
    """The round's holder figures (``min_holders`` 0: nothing was updated)."""

    min_holders: int
    exposed_fraction: float
    nodes: Mapping[int, tuple[int, float]]
    """node -> (the smallest holder count of what it holds, its exposed share)."""


def whole(keys) -> dict[str, None]:
    """A holding of whole tensors (ResIST's sub-networks, FedAvg's full model)."""
    return {key: None for key in keys}


def key_holders(held: Mapping[int, Iterable[str]]) -> dict[str, int]:
    """Per name, how many nodes hold it whole (``held``: node -> the names it holds)."""
    return dict(Counter(key for keys in held.values() for key in keys))


def too_few_holders(sent: Mapping[int, Iterable[str]], accepted: Mapping[int, Iterable[str]],
                    minimum: int) -> set[str]:
    """The names sent this round that fewer than ``minimum`` accepted replies hold (whole; none
    when ``minimum`` <= 1): what a merge must withhold under ``privacy-min-holders`` (a rejected or
    missing co-holder would otherwise leave a parameter merged over one node)."""
    if minimum <= 1:
        return set()
    counts = key_holders(accepted)
    return {key for keys in sent.values() for key in keys if counts.get(key, 0) < minimum}


def holder_counts(shapes: Mapping[str, tuple[int, ...]], holdings: Mapping[int, Holding]) -> dict[str, np.ndarray]:
    """Per name held by anyone: how many nodes hold each of its elements."""
    counts: dict[str, np.ndarray] = {}
    for holding in holdings.values():
        for key, index in holding.items():
            if key not in shapes:
                raise KeyError(f"{key!r} is held but not a parameter of the model")
            current = counts.get(key, np.zeros((), dtype=np.int64))
            if index is None and current.ndim == 0:
                counts[key] = current + 1
                continue
            if current.ndim == 0:
                current = np.full(shapes[key], int(current), dtype=np.int64)
            if index is None:
                current += 1
            else:
                current[index] += 1
            counts[key] = current
    return counts


def exposure(shapes: Mapping[str, tuple[int, ...]], holdings: Mapping[int, Holding], k: int) -> Exposure:
    """:class:`Exposure` of the round for the rule "at least ``k`` holders"."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k = {k!r}: expected a whole number of nodes >= 1")
    counts = holder_counts(shapes, holdings)
    exposed_total = held_total = 0
    nodes: dict[int, tuple[int, float]] = {}
    for node, holding in holdings.items():
        exposed = held = 0
        smallest = 0
        for key, index in holding.items():
            count = counts[key]
            if count.ndim == 0:
                size = int(np.prod(shapes[key], dtype=np.int64))
                low = int(count)
                few = size if int(count) < k else 0
            else:
                mine = count if index is None else count[index]
                size = int(mine.size)
                low = int(mine.min()) if size else 0
                few = int(np.count_nonzero(mine < k))
            if size:
                smallest = low if smallest == 0 else min(smallest, low)
            exposed, held = exposed + few, held + size
        nodes[node] = (smallest, exposed / held if held else 0.0)
        exposed_total, held_total = exposed_total + exposed, held_total + held
    lows = [low for low, _ in nodes.values() if low > 0]
    return Exposure(min(lows, default=0), exposed_total / held_total if held_total else 0.0, nodes)
