"""ResIST and the static depth prefix as Flower strategies (Message API): thin classes over the shared round.

:class:`ResIST` plans the round (:class:`~resist_fl.flower.round_skeleton.SubModelStrategy`): each
sampled node gets the blocks a dealing (:mod:`resist_fl.core.dealing`) gives it within its budget,
and only its sub-network's arrays; everything else (sampling, screening, the merge over each
tensor's holders, exposure, the report) is the shared round's. :class:`DepthPrefix` overrides one
hook, the dealing.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import log

from resist_fl.core.allocation import SPEED_WEIGHT_BOUND, bounded_weights
from resist_fl.core.dealing import Dealing, PrefixDealing, RandomDealing, Warmup
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.holders import whole
from resist_fl.core.model_cost import Cost, CostModel, max_depth
from resist_fl.flower.message_keys import BLOCKS
from resist_fl.flower.method_factory import Built, ModelParts
from resist_fl.flower.round_skeleton import Plan, SubModelStrategy
from resist_fl.run.settings import RunSettings, settings_of

PHASE_WARMUP = "warmup"
PHASE_RESIST = "resist"
"""Values of the ``phase`` column: a warm-up (FedAvg) round, a decomposed round."""


class ResIST(SubModelStrategy):
    """Layer-wise decomposition of a ResNet into per-node sub-networks.

    Parameters
    ----------
    layout : BlockLayout
        Shared keys and partitionable blocks of the global model.
    settings : RunSettings, optional
        The run's values (default: RunSettings' defaults); ResIST reads, besides the shared round's,
        ``min-blocks-per-site`` (minimum depth m), ``allocation`` (``uniform``: the paper's equal
        depths; ``capacity``; ``speed``: measured blocks per second), ``warmup-rounds`` (the first k
        rounds train the full model as FedAvg: the paper's large-scale recipe) and
        ``privacy-min-holders`` (deal every block to at least this many nodes within their
        capacities; ``privacy-strict``: a round that cannot meet it is not sent).
    costs : CostModel, optional
        The measured costs: a node's maximum depth is the most blocks within its capacity under
        ``capacity-measure`` (else ``max(1, floor(capacity * P))``).
    **overrides
        RunSettings fields to change (``ResIST(layout, min_train_nodes=4, capacity_measure='blocks')``).
    """

    label = "resist"

    def __init__(self, layout: BlockLayout, settings: RunSettings | None = None, *, costs: CostModel | None = None,
                 **overrides: Any) -> None:
        settings = settings_of(settings, overrides)
        if settings.min_blocks_per_site > len(layout.partitionable):
            raise ValueError(f"min_blocks_per_site = {settings.min_blocks_per_site} exceeds the "
                             f"{len(layout.partitionable)} partitionable blocks")
        super().__init__(layout.payload_keys(), settings, costs)
        self.layout = layout
        dealing = self.make_dealing()
        self.dealing = Warmup(settings.warmup_rounds, dealing) if settings.warmup_rounds else dealing
        self.num_subnetworks = max(1, settings.min_train_nodes)
        self.last_phase = PHASE_WARMUP if settings.warmup_rounds else PHASE_RESIST
        self._held_fraction: float | None = None
        self.last_untrained: tuple[str, ...] = ()

    def make_dealing(self) -> Dealing:
        """ResIST's random decomposition (what :class:`DepthPrefix` overrides)."""
        return RandomDealing(self.settings.min_blocks_per_site, self.settings.privacy_min_holders)

    # -- the plan ------------------------------------------------------------------------------
    def plan(self, sampled: list[int], run_round: int, rng: np.random.Generator, server_round: int) -> dict[int, Plan]:
        blocks = self.layout.partitionable
        self.num_subnetworks = len(sampled)
        decomposition = self.dealing.deal(blocks, [self.max_depth_of(n) for n in sampled],
                                          self.depth_weights(sampled), rng, run_round)
        self.last_phase = PHASE_WARMUP if decomposition.whole else PHASE_RESIST
        self._held_fraction, self.last_untrained = decomposition.held_fraction, decomposition.untrained
        if decomposition.untrained:
            log(WARNING, "round %d: the sampled nodes' capacities cover %d of %d blocks; untrained this round: %s",
                server_round, len(blocks) - len(decomposition.untrained), len(blocks),
                ", ".join(decomposition.untrained))
        if not decomposition.whole and self.min_holders > 1 and \
                not self.min_holders_met(server_round, sampled, decomposition.groups):
            return {}
        return {n: self.plan_of(held, decomposition.whole) for n, held in zip(sampled, decomposition.groups)}

    def smallest_sub_model(self) -> tuple[float, Cost | None]:
        """The shared layers and one block, counted as the heaviest (:meth:`CostModel.floor`)."""
        return 1 / len(self.layout.partitionable), self.costs.floor() if self.costs is not None else None

    def plan_of(self, held: tuple[str, ...], whole_model: bool = False) -> Plan:
        """The plan of a node holding the blocks ``held`` (``whole_model``: sent without them, as FedAvg sends it)."""
        return Plan(whole(self.layout.payload_keys(held)), {} if whole_model else {BLOCKS: list(held)},
                    share=len(held) / len(self.layout.partitionable),
                    cost=self.costs.depth_cost(held) if self.costs is not None else None,
                    blocks=len(held), group=held)

    def min_holders_met(self, server_round: int, sampled: list[int], groups: list[tuple[str, ...]]) -> bool:
        """Whether every block has ``privacy-min-holders`` holders (a WARNING if not; with
        ``privacy-strict`` the round is then not sent)."""
        blocks = self.layout.partitionable
        fewest = min(sum(b in g for g in groups) for b in blocks)
        if fewest >= self.min_holders:
            return True
        strict = self.settings.privacy_strict
        log(WARNING, "round %d: privacy-min-holders = %d cannot be met: the %d sampled nodes' capacities allow %d "
            "block slots, %d x %d blocks are needed; the least-held block has %d holder(s)%s", server_round,
            self.min_holders, len(sampled), sum(self.max_depth_of(n) for n in sampled), self.min_holders, len(blocks),
            fewest, "; privacy-strict: the round is not sent" if strict else "")
        if strict:
            self.last_privacy = {"privacy-unmet": 1}
        return not strict

    def depth_weights(self, nodes: list[int]) -> list[float] | None:
        """Allocation weights of ``nodes``: None (equal), capacities, or measured speeds (a node
        not measured yet counts at the median of the measured ones; none measured: capacities),
        each speed bounded to within :data:`~resist_fl.core.allocation.SPEED_WEIGHT_BOUND` times
        the round's median (:func:`~resist_fl.core.allocation.bounded_weights`)."""
        if self.settings.allocation == "uniform":
            return None
        capacities = [self.sampler.capacity(n) for n in nodes]
        known = [self.speeds[n] for n in nodes if n in self.speeds]
        if self.settings.allocation == "capacity" or not known:
            return capacities
        median = float(np.median(known))
        return bounded_weights([self.speeds.get(n, median) for n in nodes], SPEED_WEIGHT_BOUND)

    def max_depth_of(self, node: int) -> int:
        """The most partitionable blocks ``node``'s capacity allows (under ``capacity_measure``)."""
        capacity = self.sampler.capacity(node)
        if self.costs is None:
            return max_depth(capacity, len(self.layout.partitionable))
        return self.costs.max_depth(capacity, self.settings.capacity_measure)

    # -- what the shared round asks of a depth method -------------------------------------------
    def max_blocks(self, node: int) -> int | None:
        return self.max_depth_of(node)

    def phase(self) -> str | None:
        return self.last_phase

    def held_fraction(self) -> float | None:
        return self._held_fraction

    def plan_metrics(self) -> dict[str, float | int]:
        return {"untrained-blocks": len(self.last_untrained)}

    def withheld_blocks(self, withheld: set[str]) -> int:
        return sum(any(k in withheld for k in self.layout.block_keys(b)) for b in self.layout.partitionable)

    def inference_scales(self) -> dict[str, float]:
        """Residual scale of each partitionable block for the full model: the mean fraction of the
        blocks the last round's sub-networks held (before any round: the uniform rule)."""
        return self.layout.inference_scales(self.num_subnetworks, self.settings.min_blocks_per_site,
                                            self._held_fraction)

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        """Continue after ``completed_rounds`` rounds: sampling and decomposition continue the seeded
        sequence, and the inference scale is the last recorded round's until a round is configured."""
        super().resume_after(completed_rounds, last_row)
        if last_row:
            self.num_subnetworks = int(last_row.get("num-subnetworks", self.num_subnetworks))
            self._held_fraction = last_row.get("held-fraction", self._held_fraction)

    def summary(self) -> None:
        p = len(self.layout.partitionable)
        log(INFO, "\t├──> %s decomposition:", self.label)
        log(INFO, "\t│\t├── partitionable blocks: %d (%s ... %s), shared keys: %d", p,
            self.layout.partitionable[0], self.layout.partitionable[-1], len(self.layout.shared_keys))
        log(INFO, "\t│\t├── min blocks per sub-network: %d, weighting: %s",
            self.settings.min_blocks_per_site, self.settings.weighting)
        scales = self.inference_scales()
        if scales:
            log(INFO, "\t│\t└── inference scale with S=%d sub-networks: %.4f", self.num_subnetworks,
                next(iter(scales.values())))
        else:
            log(INFO, "\t│\t└── no inference scale: the blocks are evaluated as they were trained")
        super().summary()


class DepthPrefix(ResIST):
    """A static prefix of ResIST's blocks (``depth-prefix``, formerly ``depth-tiers``): a node always
    trains the first blocks of the partitionable stages that fit its budget, with the one classifier.
    Not DepthFL (no classifier per depth, no mutual distillation, no ensemble of exits:
    :mod:`resist_fl.flower.depthfl`) nor InclusiveFL."""

    label = "depth-prefix"

    def make_dealing(self) -> Dealing:
        return PrefixDealing()

    def client_tiers(self) -> dict[int, int]:
        """Each partition's number of blocks: the most its node's capacity allows (its prefix is what it runs)."""
        if self.costs is None:
            return {}
        measure = self.settings.capacity_measure
        return {p: self.costs.max_depth(c, measure) for p, c in self.sampler.partition_capacities().items()}

    def tier_model(self, tier: int, state: Mapping[str, Any]) -> torch.nn.Module:
        """The sub-network of the first ``tier`` blocks, its blocks at residual scale 1 (as trained)."""
        kept = self.layout.partitionable[:tier]
        model = self.layout.build_subnetwork(self.costs.spec, kept)
        model.load_state_dict({k: state[k] for k in self.layout.payload_keys(kept)}, strict=False)
        return model

    def inference_scales(self) -> dict[str, float]:
        """None: a depth method evaluates its global model as its blocks were trained (residual scale 1),
        as InclusiveFL and DepthFL do; ResIST's 1/S-like scale belongs to its random decomposition.
        (The committed ``hetero-baselines`` runs predate this and were evaluated with ResIST's scale.)"""
        return {}


def from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='resist'``: the random layer-wise decomposition (the method table's factory)."""
    return Built(ResIST(model.layout, settings, costs=model.costs), model)


def depth_prefix_from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='depth-prefix'``: every node the first blocks its budget allows (the method table's factory)."""
    return Built(DepthPrefix(model.layout, settings, costs=model.costs), model)
