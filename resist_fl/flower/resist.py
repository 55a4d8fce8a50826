"""ResIST as a Flower strategy (Message API).

A thin adapter over the pure logic in :mod:`resist_fl.core.decomposition`,
:mod:`resist_fl.core.aggregation` and :mod:`resist_fl.core.validation`: each round it
samples nodes reproducibly, deals one sub-network per sampled node, sends each
node only its sub-network's arrays, validates the replies and merges them into
the FULL global record, which it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from resist_fl.core.aggregation import check_server_lr, merge_partial, server_step, update_weights
from resist_fl.core.allocation import (
    ALLOCATIONS,
    SPEED_WEIGHT_BOUND,
    allocate_depths,
    prefix_blocks,
    bounded_weights,
    deal_blocks,
    max_depth,
)
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.holders import exposure, key_holders, too_few_holders, whole
from resist_fl.core.model_cost import CAPACITY_MEASURES, CostModel
from resist_fl.core.transport import check_transport
from resist_fl.flower.array_codec import array_view, with_arrays
from resist_fl.flower.central_dp import BELOW_CLIP, CentralDP
from resist_fl.flower.message_keys import BLOCKS, DP_CLIP, RUN_ROUND, SERVER_ROUND, TRANSPORT
from resist_fl.flower.metering import MeteredGrid
from resist_fl.flower.node_sampling import NodeSampler
from resist_fl.flower.reply_screening import (
    Accepted,
    encoded_record,
    refuse_non_finite,
    screen_replies,
    too_few_replies,
)
from resist_fl.flower.round_report import NodeReport, RoundReport
from resist_fl.flower.method_factory import Built, ModelParts, central_dp
from resist_fl.run.settings import RunSettings

DEALINGS = ("random", "prefix")
"""How blocks are dealt: ResIST's random decomposition, or static depth tiers (prefixes)."""
MIN_TRAIN_SECONDS = 1e-3
"""Shortest training time a speed is computed from (a subnormal claim cannot make it infinite)."""
PHASE_WARMUP = "warmup"
PHASE_RESIST = "resist"
"""Values of the ``phase`` column: a warm-up (FedAvg) round, a decomposed round."""


class ResIST(Strategy):
    """Layer-wise decomposition of a ResNet into per-node sub-networks.

    A :class:`~resist_fl.flower.round_report.RecordedStrategy`: :meth:`round_report`,
    :meth:`inference_scales` and :meth:`resume_after` are what a recorder reads and sets.

    Parameters
    ----------
    layout : BlockLayout
        Shared keys and partitionable blocks of the global model.
    fraction_train : float
        Fraction of the connected nodes sampled each round (at least
        ``min_train_nodes``); each sampled node gets its own sub-network.
    min_train_nodes, min_available_nodes : int
        Minimum nodes to sample / to wait for before sampling.
    min_blocks_per_site : int
        Minimum depth m: a sub-network holds at least this many blocks.
    weighting : str
        ``examples`` (weight replies by ``num-examples``) or ``uniform``.
    min_train_replies : int
        With fewer valid replies, the round leaves the global model unchanged.
    max_num_examples : int
        Replies claiming more examples are rejected.
    seed : int
        Node sampling and decomposition are a function of (seed, run round); a resumed run's
        rounds continue from :meth:`resume_after`.
    server_lr : float
        Server step: every merged parameter moves this fraction of the way from
        the global value to the merge (1.0, the default, is the paper's merge).
    transport : str
        How float arrays travel in both directions (:data:`~resist_fl.core.transport.TRANSPORT_DTYPES`);
        the global model and the merge stay float32.
    allocation : str
        How many blocks each sampled node gets (:data:`~resist_fl.core.allocation.ALLOCATIONS`):
        ``uniform`` (the paper's equal depths), ``capacity`` (in proportion to the capacity each
        node reported) or ``speed`` (in proportion to its measured blocks per second in earlier
        rounds). Always within each node's maximum depth, ``max(1, floor(capacity * P))``.
    dealing : str
        ``random`` (ResIST: a fresh random decomposition every round) or ``prefix`` (static depth
        tiers, the model split of InclusiveFL / DepthFL: a node always trains the first blocks of
        the partitionable stages that fit its budget; ``label`` becomes ``depth-tiers``).
    costs : CostModel, optional
        The measured costs of the global model's sub-networks: a node's maximum depth is then
        the most blocks within its capacity under ``capacity_measure`` (else ``floor(c * P)``),
        and every node's report carries the FLOPs per sample and parameters it was sent.
    capacity_measure : str
        What a capacity is a fraction of (:data:`~resist_fl.core.model_cost.CAPACITY_MEASURES`).
    min_holders : int
        ``privacy-min-holders``: deal every partitionable block to at least this many of the
        sampled nodes (within their capacities; 1: ResIST's dealing). A round whose capacities
        cannot meet it is announced before it is sent and, with ``privacy_strict``, not sent.
    exposure_threshold : int
        ``exposed-fraction`` counts the updates merged over fewer nodes than this (default 2).
    private : bool
        The nodes train under DP (``dp='local'``; implied by ``dp``): their replies carry no loss
        or times, and the round's metrics hold reply counts only.
    dp : CentralDP, optional
        Client-level central DP (``dp='central'``): nodes clip their updates to ``dp.clip``,
        replies above it are rejected, the merge is uniform over each parameter's holders with
        noise ``z * C / h``, and every round's epsilon is accounted (needs ``weighting='uniform'``).
    warmup_rounds : int
        The paper's large-scale recipe: run rounds ``1 .. warmup_rounds`` of the run as FedAvg
        (every sampled node gets and returns the full model; the merge, a weighted mean over
        the holders, is then FedAvg's weighted mean) and decompose from the next round on.
        :attr:`last_phase` names the phase of the last configured round.
    """

    label = "resist"
    """The ``strategy`` column of what a recorder writes."""

    def __init__(self, layout: BlockLayout, *, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, min_blocks_per_site: int = 0,
                 weighting: str = "examples", min_train_replies: int = 1,
                 max_num_examples: int = 10_000_000, seed: int = 0,
                 server_lr: float = 1.0, transport: str = "float32", allocation: str = "uniform",
                 warmup_rounds: int = 0, costs: CostModel | None = None, capacity_measure: str = "blocks",
                 dealing: str = "random", min_holders: int = 1, exposure_threshold: int = 2,
                 privacy_strict: bool = False, dp: CentralDP | None = None, private: bool = False) -> None:
        update_weights([], weighting)  # validates the name
        if dp is not None and weighting != "uniform":
            raise ValueError(f"weighting = {weighting!r}: central DP needs 'uniform' (example weights would change "
                             "each node's sensitivity)")
        if isinstance(min_holders, bool) or not isinstance(min_holders, int) or min_holders < 1:
            raise ValueError(f"privacy-min-holders = {min_holders!r}: expected a whole number of nodes >= 1")
        if min_holders > 1 and dealing != "random":
            raise ValueError(f"privacy-min-holders = {min_holders}: only ResIST's random dealing deals a block to "
                             "several nodes; depth tiers are prefixes")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation = {allocation!r}: expected one of {', '.join(ALLOCATIONS)}")
        if dp is not None and allocation == "speed":
            raise ValueError("allocation = 'speed': under central DP the dealing must not depend on what nodes "
                             "report (their timing); use 'uniform' or 'capacity'")
        check_transport(transport)
        check_server_lr(server_lr)
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 0:
            raise ValueError(f"warmup_rounds = {warmup_rounds!r}: expected a whole number of rounds >= 0")
        if min_blocks_per_site > len(layout.partitionable):
            raise ValueError(f"min_blocks_per_site = {min_blocks_per_site} exceeds the "
                             f"{len(layout.partitionable)} partitionable blocks")
        self.layout = layout
        self.sampler = NodeSampler(fraction=fraction_train, min_nodes=min_train_nodes,
                                   min_available_nodes=min_available_nodes, seed=seed,
                                   secret=dp is not None and dp.secret)
        self.min_blocks_per_site = min_blocks_per_site
        self.weighting = weighting
        self.min_train_replies = min_train_replies
        self.max_num_examples = max_num_examples
        self.round_offset = 0  # rounds done before this start() (resume_after)
        self.server_lr = server_lr
        self.transport = transport
        self.allocation = allocation
        if capacity_measure not in CAPACITY_MEASURES:
            raise ValueError(f"capacity_measure = {capacity_measure!r}: expected one of {', '.join(CAPACITY_MEASURES)}")
        if capacity_measure != "blocks" and costs is None:
            raise ValueError(f"capacity_measure = {capacity_measure!r} needs costs (a CostModel of the model)")
        self.costs, self.capacity_measure = costs, capacity_measure
        self.warmup_rounds = warmup_rounds
        if dealing not in DEALINGS:
            raise ValueError(f"dealing = {dealing!r}: expected one of {', '.join(DEALINGS)}")
        self.dealing = dealing
        self.min_holders, self.exposure_threshold = min_holders, max(2, exposure_threshold, min_holders)
        self.privacy_strict, self.dp = privacy_strict, dp
        self.private = private or dp is not None  # DP replies carry no loss or times (local DP too)
        self.last_privacy: dict[str, Any] = {}
        self.last_exposure: dict[int, tuple[int, float]] = {}
        self._connected = 0
        self.label = "resist" if dealing == "random" else "depth-tiers"
        self.last_phase = PHASE_WARMUP if warmup_rounds else PHASE_RESIST
        self.num_subnetworks = max(1, min_train_nodes)
        self.held_fraction: float | None = None  # of the last round's sub-networks
        self.speeds: dict[int, float] = {}  # node -> blocks per second, from its last accepted reply
        self.last_blocks: dict[int, tuple[str, ...]] = {}  # node -> the blocks it was sent this round
        self.last_untrained: tuple[str, ...] = ()
        self.last_round_metrics: dict[str, float | int] = {}
        self.last_replies: dict[int, dict[str, float | int]] = {}  # node -> accepted reply's metrics
        self._global: ArrayRecord | None = None
        self._grid: Grid | None = None  # the round's Grid (a MeteredGrid under start())
        self._sent: dict[int, tuple[str, ...]] = {}  # node -> the keys it was sent this round
        self._messages: list[Message] = []
        self.rates_seen: set[float] = set()  # widths to evaluate the global model at: none (whole blocks)

    # -- what the ServerApp needs (RecordedStrategy) ------------------------------------------
    def round_report(self) -> RoundReport:
        """The last round: reply counts and figures, phase, held fraction, and per node the blocks
        it was sent, its accepted reply's metrics and its measured speed."""
        nodes = {n: self.node_report(n) for n in self._sent}
        return RoundReport(dict(self.last_round_metrics), nodes, self.last_phase, self.held_fraction,
                           privacy=dict(self.last_privacy))

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        """Continue after ``completed_rounds`` rounds: the next round is ``completed_rounds + 1``
        of the run (sampling and decomposition continue the seeded sequence), and the inference
        scale is the last recorded round's until a round is configured."""
        self.round_offset = int(completed_rounds)
        if last_row:
            self.num_subnetworks = int(last_row.get("num-subnetworks", self.num_subnetworks))
            self.held_fraction = last_row.get("held-fraction", self.held_fraction)
            if self.dp is not None:
                self.dp.restore(last_row.get("dp-state"))

    def phase(self, run_round: int) -> str:
        """``warmup`` (full model, FedAvg) for rounds up to ``warmup_rounds``, then ``resist``."""
        return PHASE_WARMUP if run_round <= self.warmup_rounds else PHASE_RESIST

    def inference_scales(self) -> dict[str, float]:
        """Residual scale of each partitionable block for the full model: the mean fraction of the
        blocks the last round's sub-networks held (before any round: the uniform rule)."""
        return self.layout.inference_scales(self.num_subnetworks, self.min_blocks_per_site, self.held_fraction)

    def depth_weights(self, nodes: list[int]) -> list[float] | None:
        """Allocation weights of ``nodes``: None (equal), capacities, or measured speeds (a node
        not measured yet counts at the median of the measured ones; none measured: capacities),
        each speed bounded to within :data:`~resist_fl.core.allocation.SPEED_WEIGHT_BOUND` times
        the round's median (:func:`~resist_fl.core.allocation.bounded_weights`)."""
        if self.allocation == "uniform":
            return None
        capacities = [self.sampler.capacity(n) for n in nodes]
        known = [self.speeds[n] for n in nodes if n in self.speeds]
        if self.allocation == "capacity" or not known:
            return capacities
        median = float(np.median(known))
        return bounded_weights([self.speeds.get(n, median) for n in nodes], SPEED_WEIGHT_BOUND)

    def max_depth_of(self, node: int) -> int:
        """The most partitionable blocks ``node``'s capacity allows (under ``capacity_measure``)."""
        capacity = self.sampler.capacity(node)
        if self.costs is None:
            return max_depth(capacity, len(self.layout.partitionable))
        return self.costs.max_depth(capacity, self.capacity_measure)

    def node_report(self, node: int) -> NodeReport:
        """What ``node`` was sent this round, its reply and what that cost."""
        held = self.last_blocks.get(node, self.layout.partitionable)
        limit = self.max_depth_of(node)
        flops = params = None
        over = len(held) > limit
        if self.costs is not None:
            cost = self.costs.depth_cost(held)
            flops, params = cost.flops, cost.params
            if self.capacity_measure != "blocks":
                over = cost.of(self.capacity_measure) > self.sampler.capacity(node) * \
                    self.costs.full.of(self.capacity_measure) * (1 + 1e-9)
        low, share = self.last_exposure.get(node, (None, None))
        return NodeReport(len(held), self.last_replies.get(node, {}), self.speeds.get(node), limit, over, flops, params,
                          min_holders=low, exposed_fraction=share,
                          epsilon=self.dp.node_epsilon(self.sampler.key(node)) if self.dp is not None else None)

    def measured_seconds(self, reply: Accepted, message_id: str) -> float:
        """The seconds a node's training took, as far as the server can tell: the time the server
        observed from pushing its message to pulling its reply (when the Grid is a
        :class:`~resist_fl.flower.metering.MeteredGrid`), or the node's own ``train-seconds`` if
        that is longer (a node may only claim to be slower than observed), at least
        :data:`MIN_TRAIN_SECONDS`."""
        observed = self._grid.observed_seconds(message_id) if isinstance(self._grid, MeteredGrid) else None
        claimed = float(reply.metrics.get("train-seconds", 0.0))
        return max(observed or 0.0, claimed, MIN_TRAIN_SECONDS)

    def start(self, grid: Grid, *args, **kwargs):
        """``Strategy.start`` on a :class:`~resist_fl.flower.metering.MeteredGrid` (``grid`` itself
        if it is one), so node speeds are observed by the server."""
        return super().start(grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid), *args, **kwargs)

    def summary(self) -> None:
        p = len(self.layout.partitionable)
        log(INFO, "\t├──> ResIST decomposition:")
        log(INFO, "\t│\t├── partitionable blocks: %d (%s ... %s), shared keys: %d", p,
            self.layout.partitionable[0], self.layout.partitionable[-1], len(self.layout.shared_keys))
        log(INFO, "\t│\t├── min blocks per sub-network: %d, weighting: %s",
            self.min_blocks_per_site, self.weighting)
        log(INFO, "\t│\t└── inference scale with S=%d sub-networks: %.4f", self.num_subnetworks,
            next(iter(self.inference_scales().values())))
        log(INFO, "\t└──> Sampling: fraction %.2f, min train nodes %d, min available %d, seed %d",
            self.sampler.fraction, self.sampler.min_nodes, self.sampler.min_available_nodes, self.sampler.seed)

    # -- training ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes and send each its own sub-network's arrays and block ids."""
        if missing := sorted(set(self.layout.payload_keys()) - set(arrays)):
            raise ValueError(f"the global record lacks {len(missing)} model keys, e.g. {missing[:3]}")
        run_round = self.round_offset + server_round
        sampled, connected, rng = self.sampler.sample(grid, run_round)
        self._connected = connected
        if self.dp is not None:
            self.dp.stop_if_exceeded(len(sampled), connected, run_round)
        blocks = self.layout.partitionable
        self.last_phase = self.phase(run_round)
        if self.last_phase == PHASE_WARMUP:  # the full model to every sampled node
            groups = [None] * len(sampled)
            self.held_fraction = 1.0
            self.last_blocks = {n: blocks for n in sampled}
            self.last_untrained = ()
        else:
            maxima = [self.max_depth_of(n) for n in sampled]
            if self.dealing == "prefix":  # depth tiers: always the first blocks that fit
                decomposition = prefix_blocks(blocks, maxima)
            else:
                depths = allocate_depths(len(blocks), maxima, self.depth_weights(sampled), self.min_blocks_per_site,
                                         copies=self.min_holders)
                decomposition = deal_blocks(blocks, depths, rng)
            groups = decomposition.groups
            self.held_fraction = decomposition.held_fraction
            self.last_blocks = dict(zip(sampled, groups))
            self.last_untrained = decomposition.untrained
            if decomposition.untrained:
                log(WARNING, "round %d: the sampled nodes' capacities cover %d of %d blocks; untrained this round: %s",
                    server_round, len(blocks) - len(decomposition.untrained), len(blocks),
                    ", ".join(decomposition.untrained))
        self.num_subnetworks = len(sampled)
        self._global = arrays
        self._grid = grid
        self._sent = {}
        self.last_privacy, self.last_exposure = {}, {}
        if self.min_holders > 1 and self.last_phase == PHASE_RESIST:
            fewest = min(sum(b in g for g in groups) for b in blocks)
            if fewest < self.min_holders:
                log(WARNING, "round %d: privacy-min-holders = %d cannot be met: the %d sampled nodes' capacities "
                    "allow %d block slots, %d x %d blocks are needed; the least-held block has %d holder(s)%s",
                    server_round, self.min_holders, len(sampled), sum(self.max_depth_of(n) for n in sampled),
                    self.min_holders, len(blocks), fewest, "; privacy-strict: the round is not sent"
                    if self.privacy_strict else "")
                if self.privacy_strict:
                    self.last_privacy = {"privacy-unmet": 1}
                    self.last_blocks, self._messages = {}, []
                    return []
        messages = []
        wire = encoded_record(arrays, self.transport)  # each array encoded once, whatever its holders
        for node_id, held in zip(sampled, groups):
            keys = self.layout.payload_keys(held)
            self._sent[node_id] = keys
            payload = ArrayRecord()
            for key in keys:
                payload[key] = wire[key]
            node_config = ConfigRecord({**config, SERVER_ROUND: server_round, RUN_ROUND: run_round,
                                        TRANSPORT: self.transport})
            if self.dp is not None:  # the node clips its update to this norm; the server checks it
                node_config[DP_CLIP] = self.dp.clip
            if held is not None:  # no `blocks` (warm-up): the full model, as FedAvg sends it
                node_config[BLOCKS] = list(held)
            content = RecordDict({"arrays": payload, "config": node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        log(INFO, "configure_train: round %d (%s), %d of %d nodes, sub-network depths %s", server_round,
            self.last_phase, len(sampled), connected, [len(g if g is not None else blocks) for g in groups])
        self._messages = messages  # the Grid gives them their message ids when it pushes them
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and merge the valid ones into the full global record."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        screened = screen_replies(server_round, replies, self._sent, self._global, self.max_num_examples,
                                  messages=self._messages, order=self.sampler.rank, transport=self.transport,
                                  check=self.dp.reply_check(self._global) if self.dp is not None else None,
                                  private=self.private)
        accepted = screened.accepted
        withheld = too_few_holders(self._sent, {a.node_id: tuple(a.update) for a in accepted}, self.min_holders)
        metrics = {**screened.round_metrics(), "num-subnetworks": self.num_subnetworks, "merge-refused": 0,
                   "untrained-blocks": len(self.last_untrained)}
        if self.min_holders > 1:
            metrics["withheld-keys"] = len(withheld)
            metrics["withheld-blocks"] = sum(any(k in withheld for k in self.layout.block_keys(b))
                                             for b in self.layout.partitionable)
            if withheld:
                log(WARNING, "round %d: %d keys (%d blocks) have fewer than privacy-min-holders = %d accepted "
                    "holders: they keep their previous values", server_round, len(withheld),
                    metrics["withheld-blocks"], self.min_holders)
        # under DP a parameter's holders are the nodes it was sent to (a missing reply is a zero update)
        holding = self._sent if self.dp is not None else {a.node_id: tuple(a.update) for a in accepted}
        holding = {n: tuple(k for k in keys if k not in withheld) for n, keys in holding.items()}
        self.record_exposure({n: whole(keys) for n, keys in holding.items()})
        self.last_round_metrics = metrics
        self.last_replies = {a.node_id: dict(a.metrics) for a in accepted}
        sent_ids = {m.metadata.dst_node_id: m.metadata.message_id for m in self._messages}
        for reply in accepted:  # measured speed: blocks per second of (possibly slowed) training
            seconds = self.measured_seconds(reply, sent_ids.get(reply.node_id, ""))
            self.speeds[reply.node_id] = len(self.last_blocks.get(reply.node_id, ())) / seconds
        # under DP every round is released (a missing reply is a zero update): whether the model moves
        # must not depend on how many replies were valid
        if self.dp is None and too_few_replies(server_round, len(accepted), self.min_train_replies):
            return None, MetricRecord(metrics)
        start = time.perf_counter()
        updates = [{k: v for k, v in a.update.items() if k not in withheld} for a in accepted]
        if self.dp is not None:
            holders = key_holders(holding)
            current = {k: array_view(self._global[k]) for k in holders}
            merged = self.dp.merge(current, updates, holders)
            self.last_privacy.update(self.dp.release_row(
                [self.sampler.key(n) for n in self._sent], self._connected,
                [int(a.metrics[BELOW_CLIP]) for a in accepted if BELOW_CLIP in a.metrics]))
        else:
            touched = set().union(*updates)
            current = {k: array_view(self._global[k]) for k in self._global if k in touched}
            merged = merge_partial(current, updates,
                                   update_weights([a.num_examples for a in accepted], self.weighting))
        merged = server_step(current, merged, self.server_lr)
        metrics["merge-seconds"] = time.perf_counter() - start
        if refuse_non_finite(server_round, merged, metrics):
            return None, MetricRecord(metrics)
        return with_arrays(self._global, merged), MetricRecord(metrics)

    def record_exposure(self, holdings) -> None:
        """``min-holders`` and ``exposed-fraction`` of the round (and per node) from ``holdings``."""
        shapes = {k: tuple(self._global[k].shape) for k in self._global}
        found = exposure(shapes, holdings, self.exposure_threshold)
        self.last_privacy.update({"min-holders": found.min_holders, "exposed-fraction": found.exposed_fraction})
        self.last_exposure = dict(found.nodes)

    # -- evaluation: central only (the full model never goes to a client) --------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _from_settings(settings: RunSettings, model: ModelParts, dealing: str) -> Built:
    strategy = ResIST(model.layout, dealing=dealing, fraction_train=settings.fraction_train,
                      min_train_nodes=settings.min_train_nodes, min_available_nodes=settings.min_available_nodes,
                      min_blocks_per_site=settings.min_blocks_per_site, weighting=settings.weighting,
                      min_train_replies=settings.min_train_replies, max_num_examples=settings.max_num_examples,
                      seed=settings.seed, server_lr=settings.server_lr, transport=settings.transport_dtype,
                      allocation=settings.allocation, warmup_rounds=settings.warmup_rounds, costs=model.costs,
                      capacity_measure=settings.capacity_measure, min_holders=settings.privacy_min_holders,
                      exposure_threshold=max(2, settings.privacy_min_holders), privacy_strict=settings.privacy_strict,
                      dp=central_dp(settings), private=settings.dp != "none")
    return Built(strategy, model)


def from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='resist'``: the random layer-wise decomposition (the method table's factory)."""
    return _from_settings(settings, model, "random")


def depth_tiers_from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='depth-tiers'``: every node the first blocks its budget allows (the method table's factory)."""
    return _from_settings(settings, model, "prefix")
