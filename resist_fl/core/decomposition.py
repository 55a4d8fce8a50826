"""Layer-wise decomposition: which blocks are partitioned, and how they are dealt.

ResIST shares the stem, the classifier, every stage that is not partitioned
and the first (strided) block of every partitioned stage. The remaining blocks
of the partitioned stages (by default stage 3 only, as in the paper) are dealt
every round into S sub-networks. All functions here work on names and plain
NumPy; nothing imports Flower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from resist_fl.core.allocation import allocate_depths, deal_blocks
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.residual_nets import (
    RESIDUAL_SCALE,
    attach_residual_scales,
    find_stages,
    partitionable_blocks,
    skip_blocks,
)

SHARED = "shared"
"""Block id of every key that belongs to all sub-networks."""


@dataclass(frozen=True)
class BlockLayout:
    """State-dict keys of a model grouped into shared keys and partitionable blocks.

    Use :meth:`from_spec` to build one. Keys are the model's ``state_dict``
    names; the ``residual_scale`` buffers are part of the state_dict but never
    part of a payload (:meth:`payload_keys`): the server owns the scales.
    """

    keys: tuple[str, ...]
    """Every state_dict key of the full model, in order."""
    key_block: Mapping[str, str]
    """Key -> partitionable block name, or :data:`SHARED`."""
    partitionable: tuple[str, ...]
    """Names of the partitionable blocks (``"layer3.1"``...), in forward order."""

    @classmethod
    def from_spec(cls, spec: ModelSpec, partitioned_stages: Iterable[int] = (3,)) -> "BlockLayout":
        """Layout of ``spec`` with the given stages (1-4) partitioned."""
        stages = sorted(set(int(s) for s in partitioned_stages))
        if not stages or any(s not in (1, 2, 3, 4) for s in stages):
            raise ValueError(f"partitioned stages must be a non-empty subset of 1-4, got {stages}")
        partitionable = tuple(f"layer{s}.{i}" for s in stages for i in range(1, spec.depths[s - 1]))
        if not partitionable:
            raise ValueError(f"stages {stages} of depths {spec.depths} have no block after their "
                             "first: nothing to partition")
        with torch.device("meta"):
            keys = tuple(build_model(spec).state_dict().keys())
        key_block = {k: _block_of(k, partitionable) for k in keys}
        return cls(keys=keys, key_block=key_block, partitionable=partitionable)

    @classmethod
    def from_model(cls, model: torch.nn.Module, example: torch.Tensor,
                   stages: Sequence[str] | None = None) -> "BlockLayout":
        """Layout of any residual network (see :mod:`resist_fl.core.residual_nets`): the blocks
        after the first of each stage in ``stages`` (module paths such as ``"layer3"``) are
        partitionable. By default the stage is found in the module tree: the third of four
        stages (the paper's stage 3), else the longest. Gives every block of those stages a
        residual scale (in place); ``example`` is an input batch that checks the shapes."""
        if stages is None:
            found = find_stages(model)
            lengths = [len(model.get_submodule(s)) for s in found]
            stages = [found[2]] if len(found) == 4 else [found[lengths.index(max(lengths))]]
        stages = list(stages)
        attach_residual_scales(model, stages)
        partitionable = partitionable_blocks(model, stages, example)
        keys = tuple(model.state_dict().keys())
        return cls(keys=keys, key_block={k: _block_of(k, partitionable) for k in keys}, partitionable=partitionable)

    @property
    def shared_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if self.key_block[k] == SHARED)

    def block_keys(self, block: str) -> tuple[str, ...]:
        """State-dict keys of one partitionable block (including its scale buffer)."""
        self._check_blocks([block])
        return tuple(k for k in self.keys if self.key_block[k] == block)

    def subnetwork_keys(self, blocks: Iterable[str]) -> tuple[str, ...]:
        """State-dict keys of the sub-network holding ``blocks``, in model order."""
        held = set(blocks)
        self._check_blocks(held)
        return tuple(k for k in self.keys if self.key_block[k] in held or self.key_block[k] == SHARED)

    def payload_keys(self, blocks: Iterable[str] | None = None) -> tuple[str, ...]:
        """Keys sent to / returned by a client: the sub-network's keys without scales.

        ``blocks=None`` means the full model (what FedAvg sends).
        """
        keys = self.keys if blocks is None else self.subnetwork_keys(blocks)
        return tuple(k for k in keys if not is_scale_key(k))

    def dropped_blocks(self, blocks: Iterable[str]) -> tuple[str, ...]:
        """Partitionable blocks that a sub-network holding ``blocks`` lacks."""
        held = set(blocks)
        self._check_blocks(held)
        return tuple(b for b in self.partitionable if b not in held)

    def build_subnetwork(self, spec: ModelSpec, blocks: Iterable[str]) -> torch.nn.Module:
        """The sub-network holding ``blocks`` (any family): the model of ``spec`` with the other
        partitionable blocks skipped (:func:`~resist_fl.core.residual_nets.skip_blocks`, the one
        way a sub-network is made); its keys are :meth:`subnetwork_keys`, the global names.

        It is built on the meta device and materialised only after the skipping, so its memory
        follows its depth (the full model is never allocated). Its parameters and buffers are
        zeros and its residual scales 1.0: load the received arrays into it.
        """
        with torch.device("meta"):
            model = skip_blocks(build_model(spec), self.dropped_blocks(blocks))
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                tensor.fill_(1.0 if is_scale_key(name) else 0.0)
        return model

    def inference_scales(self, num_subnetworks: int, min_blocks: int = 0,
                         held_fraction: float | None = None) -> dict[str, float]:
        """Residual scale of every partitionable block for full-model inference: the mean
        fraction of the blocks a sub-network held (``held_fraction``, from the round's actual
        sub-networks), else the uniform rule :func:`inference_scale` of S and m."""
        if held_fraction is None:
            held_fraction = inference_scale(num_subnetworks, min_blocks, len(self.partitionable))
        elif not 0 < held_fraction:
            raise ValueError(f"held_fraction must be > 0, got {held_fraction}")
        return {b: min(1.0, float(held_fraction)) for b in self.partitionable}

    def _check_blocks(self, blocks: Iterable[str]) -> None:
        if unknown := sorted(set(blocks) - set(self.partitionable)):
            raise ValueError(f"unknown or non-partitionable blocks {unknown}; partitionable "
                             f"blocks are {self.partitionable[0]} ... {self.partitionable[-1]}")


def _block_of(key: str, partitionable: Sequence[str]) -> str:
    """The partitionable block whose module path prefixes ``key``, else :data:`SHARED`."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if (prefix := ".".join(parts[:end])) in partitionable:
            return prefix
    return SHARED


def is_scale_key(key: str) -> bool:
    """Whether ``key`` is a block's residual-scale buffer."""
    return key.rsplit(".", 1)[-1] == RESIDUAL_SCALE


def scale_key(block: str) -> str:
    """State-dict key of the residual-scale buffer of ``block``."""
    return f"{block}.{RESIDUAL_SCALE}"


def inference_scale(num_subnetworks: int, min_blocks: int, num_blocks: int) -> float:
    """Fraction of the partitionable blocks one sub-network holds.

    ``1/S`` without a minimum depth, ``max(1/S, m/P)`` with one (the paper's
    rule); a sub-network always holds at least one block, so never below
    ``1/P``, and never above 1.
    """
    _check_settings(num_subnetworks, min_blocks, num_blocks)
    return min(1.0, max(1.0 / num_subnetworks, max(1, min_blocks) / num_blocks))


def _check_settings(num_subnetworks: int, min_blocks: int, num_blocks: int) -> None:
    if num_blocks < 1:
        raise ValueError("there are no partitionable blocks")
    if num_subnetworks < 1:
        raise ValueError(f"the number of sub-networks must be >= 1, got {num_subnetworks}")
    if not 0 <= min_blocks <= num_blocks:
        raise ValueError(f"min blocks per sub-network must be in [0, {num_blocks}] (the number "
                         f"of partitionable blocks), got {min_blocks}")


def sample_subnetworks(blocks: Sequence[str], num_subnetworks: int, min_blocks: int,
                       rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Deal ``blocks`` at random into ``num_subnetworks`` sub-networks.

    The group sizes are those of splitting the blocks into S near-equal parts
    (they differ by at most one), each raised to ``max(1, min_blocks)``. The
    groups then take consecutive windows of a random cyclic order of the
    blocks. Hence every block is held at least once, no group holds a block
    twice (a window is never longer than the cycle), and when the minimum
    depth forces duplicates, hold counts differ by at most one. Each group is
    returned in forward order.
    """
    num_blocks = len(blocks)
    _check_settings(num_subnetworks, min_blocks, num_blocks)
    depths = allocate_depths(num_blocks, [num_blocks] * num_subnetworks, None, min_blocks)
    return deal_blocks(blocks, depths, rng).groups


def round_rng(seed: int, server_round: int) -> np.random.Generator:
    """The generator of one round: deterministic for a (seed, round) pair."""
    return np.random.default_rng([int(seed), int(server_round)])
