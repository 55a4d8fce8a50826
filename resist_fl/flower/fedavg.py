"""FedAvg over the shared round: every sampled node gets, trains and returns the whole global model.

A thin class over :class:`~resist_fl.flower.round_skeleton.SubModelStrategy`, so that the
comparison with ResIST differs in the plan and nothing else: the same reproducible node sampling
(Flower's FedAvg draws from the global ``random``), the same screening (a malformed reply is
dropped with a WARNING instead of ending the run, as Flower's ``InconsistentMessageReplies`` would,
or writing NaN into the global model), the same merge (the ``weighting`` mean over holders, here
every node: FedAvg's weighted mean, :func:`~resist_fl.core.aggregation.merge_partial`, integer
buffers kept integer), the same server step and report. Federated evaluation
(``fraction-evaluate`` > 0) is the shared round's.

:class:`FedAvgSmall` (``fedavg-small``) is FedAvg of the one width the weakest node fits: the
global model itself is that narrower model, and every message (evaluation included) names its width.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import log

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.holders import whole
from resist_fl.core.model_cost import Cost, CostModel, fits
from resist_fl.core.model import ModelSpec
from resist_fl.core.width_slicing import sliced_spec, widths
from resist_fl.flower.message_keys import WIDTH_RATE
from resist_fl.flower.method_factory import Built, ModelParts
from resist_fl.flower.round_skeleton import Plan, SubModelStrategy
from resist_fl.run.settings import RunSettings, settings_of


class ScreenedFedAvg(SubModelStrategy):
    """FedAvg with reproducible sampling and screened replies.

    Parameters
    ----------
    settings : RunSettings, optional
        The run's values (default: RunSettings' defaults).
    costs : CostModel, optional
        The measured costs (a node's report then carries what the full model costs it).
    **overrides
        RunSettings fields to change (``ScreenedFedAvg(min_train_nodes=3, capacity_measure='blocks')``).
    """

    label = "fedavg"

    def __init__(self, settings: RunSettings | None = None, *, costs: CostModel | None = None,
                 **overrides: Any) -> None:
        super().__init__(None, settings_of(settings, overrides), costs)

    def plan(self, sampled: list[int], run_round: int, rng: np.random.Generator, server_round: int) -> dict[int, Plan]:
        full = Plan(whole(self._global.keys()), self.evaluate_config(), share=self.width_rate or 1.0,
                    cost=self.model_cost(), width_rate=self.width_rate, group="full")
        return {node: full for node in sampled}

    width_rate: float | None = None
    """The global model's width relative to the run's model (None: the run's model)."""

    def smallest_sub_model(self) -> tuple[float, Cost | None]:
        """The global model (FedAvg sends nothing smaller)."""
        return self.width_rate or 1.0, self.model_cost()

    def model_cost(self):
        """What the global model costs a node per sample (when measured)."""
        return self.costs.full if self.costs is not None else None

    def describe(self, sampled: list[int]) -> str:
        return "the full model each"


class FedAvgSmall(ScreenedFedAvg):
    """FedAvg of the width-``width_rate`` model: every node trains (and evaluates) that model."""

    label = "fedavg-small"

    def __init__(self, width_rate: float, settings: RunSettings | None = None, *, costs: CostModel | None = None,
                 **overrides: Any) -> None:
        super().__init__(settings, costs=costs, **overrides)
        self.width_rate = width_rate
        self.warned: set[int] = set()  # nodes told they cannot afford the width

    def fit_to(self, capacities: Mapping[int, float], model: ModelParts,
               started: Mapping[str, Any] | None = None) -> ModelParts:
        """Set the width to the largest that fits the weakest capacity a node may train at, as the sampler
        knows them: the connected nodes' ``capacities`` (what each declared; a simulated node declares its
        ``capacity-profile`` entry) and, under ``capacity-mode='dynamic'``, every value the sampler draws
        from; the global model is that narrower model. Resuming (``started``: the model spec
        the run started with), the width is the one of ``width-rates`` that gives that spec, whoever
        connects now."""
        if started is not None:
            rates = [r for r in (*self.settings.rates(), 1.0)  # the run config is the same (checked): only the width
                     if widths(sliced_spec(model.spec, r)) == widths(ModelSpec.from_dict(started))]
            if not rates:
                raise ValueError(f"resume: the run started with a model of base width {started.get('base_width')!r} "
                                 f"that no width of width-rates = {self.settings.width_rates!r} gives; the run "
                                 "config changed since the checkpoint")
            self.width_rate = rates[0]
            log(INFO, "fedavg-small: resuming with the width-%g model the run started with", self.width_rate)
        else:
            weakest = min((*(self.sampler.dynamic_profile or ()), *capacities.values()), default=1.0)
            self.width_rate = self.costs.max_rate(weakest, self.settings.capacity_measure, self.settings.rates())
            log(INFO, "fedavg-small: the weakest capacity is %g (of the %d nodes connected and a dynamic profile): "
                "every node trains the width-%g model", weakest, len(capacities), self.width_rate)
        spec = sliced_spec(model.spec, self.width_rate)
        return ModelParts(spec, BlockLayout.from_spec(spec, self.settings.stages()), model.costs)

    def evaluate_config(self) -> dict[str, Any]:
        """Every message that carries the global arrays names their width (training and evaluation)."""
        return {WIDTH_RATE: self.width_rate}

    def plan(self, sampled: list[int], run_round: int, rng: np.random.Generator, server_round: int) -> dict[int, Plan]:
        """FedAvg's plan at the global width; a sampled node whose capacity (the sampler's: its own node
        config or its profile entry) cannot afford that width is warned about once (its nodes.jsonl rows
        say over-capacity): the width was fixed when the global model was built (:meth:`fit_to`)."""
        plans = super().plan(sampled, run_round, rng, server_round)
        cost, measure = self.model_cost(), self.settings.capacity_measure
        full = self.costs.full if self.costs is not None else None
        for node in sampled:
            capacity = self.sampler.capacity(node)
            if node not in self.warned and (measure == "blocks" or cost is not None) and \
                    not fits(capacity, measure, self.width_rate, cost, full):
                self.warned.add(node)
                log(WARNING, "fedavg-small: node %d has capacity %g, below what its width %g costs (the width was "
                    "chosen for the weakest capacity the nodes connected at the start declared); it trains over "
                    "its budget", node, capacity, self.width_rate)
        return plans

    def model_cost(self):
        return self.costs.width_cost(self.width_rate) if self.costs is not None else None


def from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='fedavg'``: FedAvg of the full model (the method table's factory)."""
    return Built(ScreenedFedAvg(settings, costs=model.costs), model)


def small_from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='fedavg-small'``: FedAvg of the one width that fits the weakest capacity the nodes connected at
    the start declared, or a dynamic profile may draw (:meth:`FedAvgSmall.fit_to`, once they are there); that
    narrower model becomes the global model."""
    strategy = FedAvgSmall(1.0, settings, costs=model.costs)
    return Built(strategy, model, for_nodes=lambda capacities, started: strategy.fit_to(capacities, model, started))
