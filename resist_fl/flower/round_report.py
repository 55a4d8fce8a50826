"""What a strategy's round produced, declared: the one thing :class:`RoundRecorder` reads.

Every strategy the recorder can record (:class:`RecordedStrategy`: ResIST, the screened FedAvg,
or a user's own) reports its last round as a :class:`RoundReport` and takes its place in a run
through :meth:`RecordedStrategy.resume_after` (the one place a resumed run's round offset is set).
Nothing else of a strategy is read: no attribute probing, no dispatch on its type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from resist_fl.flower.node_sampling import NodeSampler


@dataclass(frozen=True)
class NodeReport:
    """One node sent a training message this round."""

    blocks: int | None
    """Partitionable blocks of the sub-network it was sent (None: the full model)."""
    reply: Mapping[str, float | int] = field(default_factory=dict)
    """Its accepted reply's metrics (:data:`~resist_fl.core.validation.TRAIN_METRICS` and the
    client costs); empty when it sent no valid reply."""
    blocks_per_second: float | None = None
    """Its speed as the server measured it (ResIST's ``speed`` allocation), if measured."""
    max_blocks: int | None = None
    """The most partitionable blocks its capacity allows (None: the recorder's blocks rule)."""
    over_capacity: bool | None = None
    """Whether what it was sent costs more than its capacity allows (None: the blocks rule)."""
    flops_per_sample: int | None = None
    """Training FLOPs per sample of what it was sent (forward + backward), when measured."""
    params: int | None = None
    """Parameters of what it was sent, when measured."""
    width_rate: float | None = None
    """The width rate of what it was sent (width-sliced methods)."""
    min_holders: int | None = None
    """The fewest nodes any parameter it held was merged over this round."""
    exposed_fraction: float | None = None
    """The share of its update merged over fewer than the exposure threshold of nodes."""
    epsilon: float | None = None
    """Under central DP: its epsilon so far (the rounds it was sent a model in)."""
    budget_used: float | None = None
    """What it was sent costs, as a fraction of its budget under ``capacity-measure`` (above 1:
    over capacity)."""
    global_width: float | None = None
    """The share of the global model's channels it held (a width method's rate; None: all of them)."""


@dataclass(frozen=True)
class RoundReport:
    """The last round of a strategy, as the recorder writes it."""

    metrics: Mapping[str, float | int] = field(default_factory=dict)
    """Counts and figures of the accepted replies (``replies-*``, ``merge-refused``,
    ``train-loss``, ``client-seconds``, ``num-subnetworks``, ...)."""
    nodes: Mapping[int, NodeReport] = field(default_factory=dict)
    """Every node sent a training message this round."""
    phase: str | None = None
    """ResIST's phase (``warmup`` or ``resist``); None for a strategy without phases."""
    held_fraction: float | None = None
    """Mean fraction of the partitionable blocks a sub-network held (None: not a sub-model method)."""
    client_evaluation: Mapping[str, float | int] = field(default_factory=dict)
    """Federated evaluation of this round (FedAvg with ``fraction-evaluate`` > 0), if any."""
    privacy: Mapping[str, Any] = field(default_factory=dict)
    """``min-holders``, ``exposed-fraction`` and, under DP, ``epsilon`` and ``dp-state`` (the
    accountant's state, what a resumed run continues from): copied into the round's row."""


class RunStops(Exception):
    """Raised by a strategy to end the run before a round it must not send (e.g. the privacy
    budget would be exceeded); caught by the recorder, which records the reason in
    ``summary.json`` (``stopped-by``)."""


@runtime_checkable
class RecordedStrategy(Protocol):
    """What :class:`~resist_fl.flower.round_recorder.RoundRecorder` needs of a strategy."""

    sampler: NodeSampler
    """The node sampler (node order, partitions and capacities for ``nodes.jsonl``)."""
    label: str
    """The default ``strategy`` column (e.g. ``resist``, ``fedavg``)."""

    def round_report(self) -> RoundReport:
        """The last round's report."""

    def inference_scales(self) -> dict[str, float]:
        """Residual scale of each partitioned block for evaluating the global model ({}: none)."""

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        """Continue a run whose rounds ``1 .. completed_rounds`` are done (0: a new run);
        ``last_row`` is the last recorded ``metrics.jsonl`` row (None for a new run)."""
