"""DepthFL (Kim et al., ICLR 2023) as a thin strategy over the shared round.

Each sampled node gets the first d stages of the multi-exit ResNet and their d exits
(:class:`~resist_fl.core.early_exits.MultiExitResNet`), d the most that fit its budget
(:meth:`~resist_fl.core.model_cost.CostModel.max_exits`); its node trains every exit with mutual
self-distillation (:mod:`resist_fl.node.mutual_distillation`, weighted by the ramp the message
carries); the merge is the shared round's mean of each whole tensor over the nodes that hold it, as
the authors' ``aggregate`` (Flower's ``baselines/depthfl/depthfl/strategy.py`` lines 95-136 at
fdef7af) averages every parameter over the clients that returned it; the global model predicts
with the mean of its four exits.

Deviations from the authors' code, each stated: nodes get their depth from their capacity (theirs:
from the client id, 25 clients per depth, ``main.py`` lines 47-48); the merge weighs by the
run's ``weighting`` (theirs: an unweighted mean, ``strategy.py`` lines 106-115; ``weighting='uniform'``
reproduces it). FedDyn's dynamic regularisation, their default (``conf/config.yaml`` line 25), is the
option ``feddyn-alpha`` (their ``alpha`` 0.1, line 27; off by default): the node side is
:mod:`resist_fl.node.feddyn_regularizer`, the server's correction of the merge
:class:`~resist_fl.core.feddyn.FedDynServer`, with the number of clients the nodes connected when the
round was sampled (theirs: ``num_clients``). Their README runs DepthFL both ways (``README.md`` lines 91
and 117: "DepthFL (FedAvg)" is ``feddyn=false kd=false``, and their HeteroFL row runs without FedDyn
too): here every method merges by the same FedAvg rule by default, so ``depthfl`` is their FedAvg
variant with self-distillation on (``kd``), and ``depthfl-distill=false`` is exactly their "DepthFL
(FedAvg)"; FedDyn is a server optimiser (stateful clients, a server-side correction) that the other
methods do not get, so a comparison with it on says so. The distillation weight ramps over 30 % of the
run's rounds (theirs: over 300 of 1000).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.early_exits import MultiExitResNet, ensemble
from resist_fl.core.feddyn import FedDynServer
from resist_fl.core.holders import whole
from resist_fl.core.model import build_model
from resist_fl.core.model_cost import Cost, CostModel
from resist_fl.flower.message_keys import DEPTH_EXITS, DISTILL_WEIGHT, FEDDYN_ALPHA
from resist_fl.flower.method_factory import Built, ModelParts
from resist_fl.flower.round_skeleton import Plan, SubModelStrategy, Update
from resist_fl.node.mutual_distillation import distillation_weight
from resist_fl.node.training import Outputs
from resist_fl.run.settings import RunSettings, settings_of


class DepthFL(SubModelStrategy):
    """Depth-tiered sub-models with an exit per stage.

    Parameters
    ----------
    layout : BlockLayout
        The layout of the full multi-exit model (``spec.exits == 4``).
    settings : RunSettings, optional
        The run's values; DepthFL reads, besides the shared round's, ``depthfl-distill`` (mutual
        self-distillation on or off) and ``feddyn-alpha`` (FedDyn's coefficient; 0: the FedAvg merge).
    costs : CostModel
        The measured costs of the multi-exit model (its spec is the global model's; under
        ``capacity-measure='blocks'`` a node's share is its stages over four).
    stages : int
        The stages (and exits) of the full model.
    """

    label = "depthfl"

    def __init__(self, layout: BlockLayout, settings: RunSettings | None = None, *, costs: CostModel,
                 stages: int = 4, **overrides: Any) -> None:
        super().__init__(layout.payload_keys(), settings_of(settings, overrides), costs)
        self.layout, self.stages = layout, stages
        self._keys_of = {d: tuple(k for k in layout.payload_keys() if held_by(k, d)) for d in range(1, stages + 1)}
        self._blocks_of = {d: sum(held_by(b, d) for b in layout.partitionable) for d in range(1, stages + 1)}
        alpha = self.settings.feddyn_alpha
        self.feddyn = FedDynServer(alpha, [k for k, _ in build_model(costs.spec).named_parameters()]) \
            if alpha > 0 else None

    def exits_of(self, node: int) -> int:
        """The most stages (with their exits) within ``node``'s budget, at least one."""
        return self.exits_for(self.sampler.capacity(node))

    def smallest_sub_model(self) -> tuple[float, Cost | None]:
        """The first stage and its exit."""
        return 1 / self.stages, self.costs.exit_cost(1)

    def exits_for(self, capacity: float) -> int:
        """The most stages (with their exits) within ``capacity``, at least one."""
        return self.costs.max_exits(capacity, self.settings.capacity_measure)

    def plan(self, sampled: list[int], run_round: int, rng: np.random.Generator, server_round: int) -> dict[int, Plan]:
        weight = distillation_weight(run_round, self.settings.num_server_rounds) if self.settings.depthfl_distill \
            else 0.0
        plans, feddyn = {}, {FEDDYN_ALPHA: self.feddyn.alpha} if self.feddyn else {}
        for node in sampled:
            d = self.exits_of(node)
            plans[node] = Plan(whole(self._keys_of[d]), {DEPTH_EXITS: d, DISTILL_WEIGHT: weight, **feddyn},
                               share=d / self.stages, cost=self.costs.exit_cost(d),
                               blocks=self._blocks_of[d], group=d)
        return plans

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update]) -> dict[str, np.ndarray]:
        """The shared mean over each tensor's holders; with FedDyn, corrected by the server's state."""
        merged = super().merge(current, updates)
        if self.feddyn is None:
            return merged
        holders = {k: sum(k in u.arrays for u in updates) for k in merged}
        return self.feddyn.correct(current, merged, holders, max(self.connected, 1))

    def client_tiers(self) -> dict[int, int]:
        """Each partition's number of stages (and exits): the most its node's capacity allows."""
        capacities = self.sampler.partition_capacities()
        return {p: self.exits_for(c) for p, c in capacities.items()}

    def tier_model(self, tier: int, state: Mapping[str, Any]) -> torch.nn.Module:
        """The first ``tier`` stages and their exits: it predicts with the mean of those exits."""
        model = build_model(replace(self.costs.spec, exits=tier))
        model.load_state_dict({k: state[k] for k in self._keys_of[tier]}, strict=False)
        return model

    def evaluation_outputs(self, model: MultiExitResNet) -> Outputs:
        """The mean of the exits (``accuracy``) and each exit alone (``accuracy-exit-<k>``, what the authors'
        ``test`` reports per classifier, ``models.py`` lines 222-224), from one pass through the trunk."""
        def outputs(images: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = model.exit_logits(images)
            return {"": ensemble(logits), **{f"exit-{i + 1}": exit_logits for i, exit_logits in enumerate(logits)}}
        return outputs

    def describe(self, sampled: list[int]) -> str:
        return f"stages (exits) {[self.plans[n].config[DEPTH_EXITS] for n in sampled if n in self.plans]}"


def held_by(key: str, stages: int) -> bool:
    """Whether the model of the first ``stages`` stages holds ``key`` (stem, ``layer1`` .. ``layer<stages>``,
    ``exits.0`` .. ``exits.<stages - 1>``)."""
    head = key.split(".", 2)
    if head[0].startswith("layer"):
        return int(head[0][len("layer"):]) <= stages
    if head[0] == "exits":
        return int(head[1]) < stages
    return True


def from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='depthfl'``: the run's model with an exit after every stage becomes the global model."""
    spec = replace(model.spec, exits=4)
    layout = BlockLayout.from_spec(spec, settings.stages())
    costs = CostModel(spec, layout, model.costs.image_size)
    return Built(DepthFL(layout, settings, costs=costs),
                 ModelParts(spec, layout, costs))
