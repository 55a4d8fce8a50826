"""From run settings to a strategy: the ServerApp's one path through the method table.

:func:`build` looks the run's ``strategy`` up in :data:`resist_fl.run.methods.METHODS` and calls
its factory, ``from_settings(settings, model) -> Built``, which lives beside its strategy class.
Under ``dp='central'`` the strategy is wrapped in
:class:`~resist_fl.flower.central_dp_strategy.CentrallyPrivate`, whatever the method. Nothing here
(or in the ServerApp) branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.serverapp import Grid

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import CostModel
from resist_fl.flower.central_dp import CentralDP
from resist_fl.flower.central_dp_strategy import CentrallyPrivate
from resist_fl.flower.round_report import RecordedStrategy
from resist_fl.run.methods import load, method
from resist_fl.run.settings import RunSettings


@dataclass(frozen=True)
class ModelParts:
    """The global model a strategy trains: its spec, block layout and measured costs."""

    spec: ModelSpec
    layout: BlockLayout
    costs: CostModel


@dataclass(frozen=True)
class Built:
    """A strategy and the global model it trains (a method may narrow it to its nodes: fedavg-small)."""

    strategy: RecordedStrategy
    model: ModelParts
    for_nodes: Callable[[Mapping[int, float], Mapping[str, Any] | None], ModelParts] | None = None
    """``for_nodes(capacities, started)``: given the connected nodes' capacities (the sampler's), the global
    model the method trains, the strategy set up for it; ``started``: on resume, the model spec the run
    started with, which it keeps (None: :attr:`model`, whoever connects)."""

    def for_federation(self, grid: Grid, started: Mapping[str, Any] | None = None) -> "Built":
        """This method's global model for the nodes connected to ``grid`` (their capacities from the
        strategy's sampler; it waits for ``min-available-nodes``), or, resuming, for the model spec the run
        started with (``started``: nobody is waited for); itself when the model does not depend on them."""
        if self.for_nodes is None:
            return self
        capacities = {} if started is not None else self.strategy.sampler.identify(grid)
        return replace(self, model=self.for_nodes(capacities, started), for_nodes=None)


def build(settings: RunSettings, model: ModelParts) -> Built:
    """The run's strategy, from its method's factory."""
    built = load(method(settings.strategy).factory)(settings, model)  # a function, or a class's from_settings
    dp = central_dp(settings)
    return built if dp is None else replace(built, strategy=CentrallyPrivate(built.strategy, dp))


def central_dp(settings: RunSettings) -> CentralDP | None:
    """The server's central-DP mechanism and accountant (``dp='central'``), else None."""
    if settings.dp != "central":
        return None
    return CentralDP(settings)
