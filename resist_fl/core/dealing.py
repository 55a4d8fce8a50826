"""How a ResIST-family strategy deals the partitionable blocks to a round's nodes.

A dealing turns every sampled node's maximum depth (what its budget allows) into the blocks it
trains this round (:class:`~resist_fl.core.allocation.Decomposition`):

- :class:`RandomDealing`: ResIST's random decomposition (depths by an allocation policy, each
  block dealt to ``copies`` nodes where the maxima allow, the dealing drawn from the round's
  generator);
- :class:`PrefixDealing`: the static depth prefix (``depth-prefix``): a node always
  trains the first blocks that fit its budget;
- :class:`Warmup`: the first rounds every node trains the whole model (full-model FedAvg, the
  paper's large-scale recipe), then another dealing deals.

Pure; nothing imports Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from resist_fl.core.allocation import Decomposition, allocate_depths, deal_blocks, prefix_blocks


class Dealing(Protocol):
    """Blocks per node from the nodes' maximum depths."""

    def deal(self, blocks: Sequence[str], maxima: Sequence[int], weights: Sequence[float] | None,
             rng: np.random.Generator, run_round: int) -> Decomposition:
        """One group of blocks per node (in the order of ``maxima``), and the blocks nobody holds."""


@dataclass(frozen=True)
class RandomDealing:
    """ResIST: depths by the allocation weights (None: equal), at least ``min_blocks`` where the
    maximum allows, every block to ``copies`` nodes where the maxima allow, dealt at random."""

    min_blocks: int = 0
    copies: int = 1

    def deal(self, blocks: Sequence[str], maxima: Sequence[int], weights: Sequence[float] | None,
             rng: np.random.Generator, run_round: int) -> Decomposition:
        depths = allocate_depths(len(blocks), maxima, weights, self.min_blocks, copies=self.copies)
        return deal_blocks(blocks, depths, rng)


@dataclass(frozen=True)
class PrefixDealing:
    """Depth tiers: every node the first blocks within its maximum (no draw, no weights)."""

    def deal(self, blocks: Sequence[str], maxima: Sequence[int], weights: Sequence[float] | None,
             rng: np.random.Generator, run_round: int) -> Decomposition:
        return prefix_blocks(blocks, maxima)


@dataclass(frozen=True)
class Warmup:
    """Rounds up to ``rounds``: every node the whole model, whatever its maximum (nothing drawn); then
    ``then`` deals."""

    rounds: int
    then: Dealing

    def deal(self, blocks: Sequence[str], maxima: Sequence[int], weights: Sequence[float] | None,
             rng: np.random.Generator, run_round: int) -> Decomposition:
        if run_round > self.rounds:
            return self.then.deal(blocks, maxima, weights, rng, run_round)
        return Decomposition([tuple(blocks)] * len(maxima), (), len(blocks), whole=True)
