"""One budget for every method: a sub-model's training cost per sample, measured.

A node's ``capacity`` in (0, 1] is a fraction of the full model's training cost per sample
(:data:`CAPACITY_MEASURES`): ``flops`` (forward + backward FLOPs of one sample, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so nothing is allocated),
``params`` (parameters), or ``blocks`` (the fraction of the partitionable blocks: ResIST's
original meaning). Each method gives a node the largest sub-model of its kind within its budget:

- ResIST / depth prefix: the most blocks d with ``shared + d * block <= budget`` (the most
  expensive partitionable block counts for every block, since the dealing is random), at least
  one: the shared layers (stem, unpartitioned stages, strided blocks, classifier) are a floor no
  ResIST sub-network goes below (:meth:`CostModel.floor_fraction`);
- width methods (HeteroFL, FedRolex, FjORD): the largest rate of :data:`WIDTH_RATES` whose
  sliced model fits, at least the smallest;
- DepthFL: the most stages (each with its exit) whose model fits, at least one. Its budget is a
  fraction of its own global model, exits included (:meth:`CostModel.max_exits`).

Pure PyTorch; nothing imports Flower.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from resist_fl.core.allocation import check_capacity
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.residual_nets import skip_blocks
from resist_fl.core.width_slicing import sliced_spec

CAPACITY_MEASURES = ("flops", "params", "blocks")
"""What a node's capacity is a fraction of: training FLOPs per sample, parameters, or blocks."""
WIDTH_RATES = (1.0, 0.5, 0.25, 0.125, 0.0625)
"""The width rates of HeteroFL's experiments (1, 1/2, 1/4, 1/8, 1/16)."""
BUDGET_TOLERANCE = 1e-9
"""Relative slack of the capacity rule (a budget computed in floating point)."""


@dataclass(frozen=True)
class Cost:
    """Training cost of one model: forward + backward FLOPs per sample, and parameters."""

    flops: int
    params: int

    def of(self, measure: str) -> int:
        """The cost under ``flops`` or ``params``."""
        if measure == "flops":
            return self.flops
        if measure == "params":
            return self.params
        raise ValueError(f"capacity-measure = {measure!r}: expected one of {', '.join(CAPACITY_MEASURES)}")


def fits(capacity: float, measure_name: str, share: float, cost: Cost | None = None,
         full: Cost | None = None) -> bool:
    """The one capacity rule of every method: whether a sub-model is within a node's budget.

    ``blocks``: its ``share`` (the fraction of the partitionable blocks it holds, or its width
    rate; 1 for the full model) is at most ``capacity``; ``flops`` / ``params``: its ``cost`` is at
    most ``capacity`` times the ``full`` model's.
    """
    used = budget_used(capacity, measure_name, share, cost, full)
    if used is None:
        raise ValueError(f"capacity-measure = {measure_name!r}: needs the measured costs (a CostModel)")
    return used <= 1 + BUDGET_TOLERANCE


def budget_used(capacity: float, measure_name: str, share: float, cost: Cost | None = None,
                full: Cost | None = None) -> float | None:
    """What a sub-model costs as a fraction of a node's budget (what :func:`fits` bounds by 1):
    ``share / capacity`` under ``blocks``, else ``cost / (capacity * full)``; None when the costs are
    not measured."""
    if measure_name == "blocks":
        return share / capacity
    if cost is None or full is None:
        return None
    return cost.of(measure_name) / (capacity * full.of(measure_name))


def max_depth(capacity: float, num_blocks: int, measure_name: str = "blocks",
              worst: Callable[[int], Cost] | None = None, full: Cost | None = None) -> int:
    """Most of ``num_blocks`` partitionable blocks a node of ``capacity`` trains (at least one), by
    :func:`fits`: under ``blocks`` the share ``d / num_blocks``; under ``flops`` / ``params``
    ``worst(d)``, the most ``d`` blocks and the shared layers can cost, against the ``full`` model's."""
    check_capacity(capacity)
    return max((d for d in range(1, num_blocks + 1)
                if fits(capacity, measure_name, d / num_blocks, worst(d) if worst else None, full)), default=1)


def measure(model: torch.nn.Module, image_size: int | tuple[int, int], in_channels: int) -> Cost:
    """FLOPs (forward + backward, per sample, in training mode) and parameters of ``model``,
    counted on the meta device (``model`` should live there: nothing is computed)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    model = model.train()
    with torch.device("meta"):
        batch = torch.zeros(2, in_channels, height, width)  # two samples: BatchNorm needs more than one
    with FlopCounterMode(display=False) as counter:
        model(batch).sum().backward()
    params = sum(p.numel() for p in model.parameters())
    return Cost(flops=int(counter.get_total_flops() // 2), params=int(params))


@functools.lru_cache(maxsize=64)
def _cost(spec: ModelSpec, image_size: tuple[int, int], dropped: tuple[str, ...] = ()) -> Cost:
    with torch.device("meta"):
        model = skip_blocks(build_model(spec), dropped)
    return measure(model, image_size, spec.in_channels)


class CostModel:
    """The training costs of the sub-models of one global model (``spec``, ``layout``) on
    ``image_size`` inputs, and the largest sub-model of each kind within a node's budget."""

    def __init__(self, spec: ModelSpec, layout: BlockLayout, image_size: int | tuple[int, int]) -> None:
        self.spec, self.layout = spec, layout
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.full = _cost(spec, self.image_size)
        blocks = layout.partitionable
        without_all = _cost(spec, self.image_size, tuple(blocks))
        self.shared = without_all  # every block skipped: what no sub-network goes below but one block
        per_stage: dict[str, Cost] = {}
        for block in blocks:  # blocks of one stage cost the same: measure one per stage
            stage = block.rsplit(".", 1)[0]
            if stage not in per_stage:
                alone = _cost(spec, self.image_size, tuple(b for b in blocks if b != block))
                per_stage[stage] = Cost(alone.flops - without_all.flops, alone.params - without_all.params)
        self.block = {b: per_stage[b.rsplit(".", 1)[0]] for b in blocks}
        self.heaviest = Cost(max(c.flops for c in per_stage.values()), max(c.params for c in per_stage.values()))
        """The most one partitionable block costs (each measure apart): what a dealt block may cost."""

    # -- ResIST and depth prefix --------------------------------------------------------------
    def depth_cost(self, blocks: Sequence[str]) -> Cost:
        """Cost of the sub-network holding ``blocks`` (shared layers plus those blocks)."""
        return Cost(self.shared.flops + sum(self.block[b].flops for b in blocks),
                    self.shared.params + sum(self.block[b].params for b in blocks))

    def floor(self) -> Cost:
        """ResIST's floor: the shared layers and one block, counted as the heaviest (as :meth:`max_depth`
        counts it): the least a node's budget must hold for any one-block sub-network to fit."""
        return Cost(self.shared.flops + self.heaviest.flops, self.shared.params + self.heaviest.params)

    def floor_fraction(self, measure_name: str = "flops") -> float:
        """:meth:`floor` as a fraction of the full model: a capacity below it cannot be met by ResIST."""
        return self.floor().of(measure_name) / self.full.of(measure_name)

    def max_depth(self, capacity: float, measure_name: str) -> int:
        """Most blocks a node of ``capacity`` trains (at least one): any that many of them fit its budget
        (:func:`max_depth`, each counted as the heaviest)."""
        def worst(d: int) -> Cost:
            return Cost(self.shared.flops + d * self.heaviest.flops, self.shared.params + d * self.heaviest.params)
        return max_depth(capacity, len(self.layout.partitionable), measure_name, worst, self.full)

    # -- width methods ----------------------------------------------------------------------------
    def width_cost(self, rate: float) -> Cost:
        """Cost of the width-``rate`` sub-model."""
        return _cost(sliced_spec(self.spec, rate), self.image_size)

    def max_rate(self, capacity: float, measure_name: str, rates: Sequence[float] = WIDTH_RATES) -> float:
        """The largest of ``rates`` whose sliced model fits the budget (:func:`fits`; at least the
        smallest); ``blocks``: the largest rate not above the capacity. A bisection: the cost grows
        with the width, so a long list (every channel count) costs a few measurements."""
        ordered = sorted(set(rates), reverse=True)

        def fit(rate: float) -> bool:
            return fits(capacity, measure_name, rate, None if measure_name == "blocks" else self.width_cost(rate),
                        self.full)

        low, high = 0, len(ordered) - 1  # the first rate that fits is in ordered[low..high], else the last
        while low < high:
            middle = (low + high) // 2
            if fit(ordered[middle]):
                high = middle
            else:
                low = middle + 1
        return ordered[low]

    # -- DepthFL ------------------------------------------------------------------------------------
    def exit_cost(self, stages: int) -> Cost:
        """Cost of DepthFL's model of the first ``stages`` stages and their exits (``spec.exits``: 4)."""
        return _cost(replace(self.spec, exits=stages), self.image_size)

    def max_exits(self, capacity: float, measure_name: str) -> int:
        """The most stages (each with its exit, :meth:`exit_cost`) within ``capacity`` of the full
        multi-exit model (:func:`fits`; ``blocks``: ``stages / 4``), at least one."""
        if not self.spec.exits:
            raise ValueError("max_exits needs DepthFL's multi-exit model (a spec with exits = 4)")
        fitting = [d for d in range(1, self.spec.exits + 1)
                   if fits(capacity, measure_name, d / self.spec.exits,
                           None if measure_name == "blocks" else self.exit_cost(d), self.full)]
        return max(fitting, default=1)
