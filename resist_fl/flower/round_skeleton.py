"""The round every strategy of this project runs, written once.

Flower's ``FedProx(FedAvg)`` is the shape: a method inherits the round and overrides what differs.
:class:`SubModelStrategy` owns sampling (:class:`~resist_fl.flower.node_sampling.NodeSampler`),
stamping (round numbers, transport), the messages, screening
(:func:`~resist_fl.flower.reply_screening.screen_replies`, the same for every method), the
minimum-holder rule, exposure, measured speeds, the capacity rule
(:func:`~resist_fl.core.model_cost.fits`), the server step, the non-finite refusal, federated
evaluation and the round report. A method supplies:

- :meth:`~SubModelStrategy.plan`: which sub-model each sampled node gets this round, as a
  :class:`Plan` (what it holds of each tensor, what it costs, what the node needs to train it);
- :meth:`~SubModelStrategy.merge`: how the accepted updates combine (default: the weighted mean over
  the holders of each whole tensor, :func:`~resist_fl.core.aggregation.merge_partial`).

Its run-level values (sampling, replies, transport, weighting, capacities, ...) come from one
:class:`~resist_fl.run.settings.RunSettings`, the only place defaults live: a strategy is built as
``Method(model..., settings)`` or ``Method(model..., **overrides)`` (RunSettings field names).
Central DP is a wrapper (:class:`~resist_fl.flower.central_dp_strategy.CentrallyPrivate`) that
recomposes the public steps :meth:`~SubModelStrategy.screen`, :meth:`~SubModelStrategy.settle` and
:meth:`~SubModelStrategy.finish` around its own merge; no strategy branches on DP.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from resist_fl.core.aggregation import merge_partial, server_step, update_weights
from resist_fl.core.decomposition import round_rng
from resist_fl.core.holders import exposure, too_few_holders
from resist_fl.core.model_cost import Cost, CostModel, budget_used, fits
from resist_fl.core.transport import encode_array
from resist_fl.flower.array_codec import array_of, array_view, with_arrays
from resist_fl.flower.message_keys import RUN_ROUND, SERVER_ROUND, TRANSPORT
from resist_fl.flower.metering import MeteredGrid
from resist_fl.flower.node_sampling import NodeSampler, sample_positions
from resist_fl.flower.reply_screening import (
    Accepted,
    ScreenedReplies,
    refuse_non_finite,
    screen_evaluate_replies,
    screen_replies,
    too_few_replies,
)
from resist_fl.flower.round_report import NodeReport, RoundReport
from resist_fl.run.settings import RunSettings

MIN_TRAIN_SECONDS = 1e-3
"""Shortest training time a speed is computed from (a subnormal claim cannot make it infinite)."""
EVALUATION_STREAM = 7_919
"""Federated evaluation samples its nodes from the seed plus this (its own stream, not the
training draw's)."""


@dataclass(frozen=True)
class Plan:
    """What one sampled node is sent this round."""

    holding: Mapping[str, Any]
    """Every key it holds: ``None`` (the whole tensor) or the index of the elements it holds
    (:func:`~resist_fl.core.width_slicing.element_index`)."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """What the node needs to build and train it (``blocks``, ``width-rate``, ...)."""
    share: float = 1.0
    """Its size under ``capacity-measure='blocks'``: the fraction of the partitionable blocks it
    holds, or its width rate."""
    cost: Cost | None = None
    """Its training cost per sample, when the model's costs are measured."""
    blocks: int | None = None
    """Partitionable blocks it holds (None: the full model)."""
    width_rate: float | None = None
    """Its width rate (width-sliced methods; FedAvg-small's relative to the configured model)."""
    global_width: float | None = None
    """The share of the global model's channels it holds (a width method's rate; None: all of them). The
    server evaluates the global model at every such width below 1 that nodes have held."""
    group: Hashable = None
    """Plans of one group hold the same elements this round: their arrays are cut and encoded once."""
    indices: Any = None
    """The method's own description of what it holds (a width method's channel index sets)."""

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.holding)


@dataclass(frozen=True)
class Update:
    """One accepted reply, as a merge sees it: its arrays (withheld keys removed) and its plan."""

    node: int
    plan: Plan
    arrays: Mapping[str, np.ndarray]
    num_examples: int
    labels: tuple[int, ...] | None = None
    """The labels its node's data holds, when it said (``labels-held``: HeteroFL's label split)."""


@dataclass
class Settled:
    """A screened round before its merge: its metrics and the updates a merge may use."""

    metrics: dict[str, float | int]
    updates: list[Update]
    withheld: set[str]
    accepted: list[Accepted]
    started: float = field(default_factory=time.perf_counter)


class SubModelStrategy(Strategy):
    """The shared round of every method (see the module docstring).

    Parameters
    ----------
    keys : sequence of str, optional
        The global record's keys (every one must be in the arrays of each round); None: whatever
        the global record holds (FedAvg).
    settings : RunSettings
        The run's values: ``fraction-train``, ``min-train-nodes``, ``min-available-nodes``,
        ``seed``, ``min-train-replies``, ``max-num-examples``, ``transport-dtype``, ``weighting``,
        ``capacity-measure``, ``server-lr``, ``privacy-min-holders``, ``fraction-evaluate``, ``dp``.
    costs : CostModel, optional
        The measured costs of the global model's sub-models (needed unless ``capacity-measure`` is
        ``blocks``).
    """

    label = "sub-model"
    """The ``strategy`` column of what a recorder writes (each method's name)."""

    def __init__(self, keys: Sequence[str] | None, settings: RunSettings, costs: CostModel | None = None) -> None:
        if settings.capacity_measure != "blocks" and costs is None:
            raise ValueError(f"capacity-measure = {settings.capacity_measure!r} needs costs (a CostModel of the "
                             "model); pass costs or set capacity_measure='blocks'")
        self.settings, self.costs = settings, costs
        self.keys = None if keys is None else tuple(keys)
        dynamic = settings.capacity_mode == "dynamic"
        self.sampler = NodeSampler(fraction=settings.fraction_train, min_nodes=settings.min_train_nodes,
                                   min_available_nodes=settings.min_available_nodes, seed=settings.seed,
                                   secret=settings.dp == "central" and settings.dp_sampling == "secret",
                                   dynamic_profile=settings.capacities() if dynamic else None)
        self.transport = settings.transport_dtype
        self.private = settings.dp != "none"  # DP replies carry no loss or times
        self.min_holders = settings.privacy_min_holders
        self.exposure_threshold = max(2, settings.privacy_min_holders)
        self.round_offset = 0  # rounds done before this start() (resume_after)
        self.connected = 0
        self.sampled: list[int] = []
        self.plans: dict[int, Plan] = {}
        self.speeds: dict[int, float] = {}  # node -> blocks per second, from its last accepted reply
        self.last_round_metrics: dict[str, float | int] = {}
        self.last_evaluate_metrics: dict[str, float | int] = {}
        self.last_replies: dict[int, dict[str, float | int]] = {}
        self.last_privacy: dict[str, Any] = {}
        self.last_skipped = 0
        self.last_exposure: dict[int, tuple[int, float]] = {}
        self._global: ArrayRecord | None = None
        self._grid: Grid | None = None
        self._messages: list[Message] = []
        self._evaluate_messages: list[Message] = []
        self._sent_arrays: dict[int, dict[str, np.ndarray]] = {}

    # -- what a method supplies ----------------------------------------------------------------
    def plan(self, sampled: list[int], run_round: int, rng: np.random.Generator,
             server_round: int) -> dict[int, Plan]:
        """Each of ``sampled``'s sub-model this round ({}: the round is not sent). ``sampled`` is never
        empty; under ``over-budget='skip'`` it holds only the nodes that afford :meth:`smallest_sub_model`."""
        raise NotImplementedError

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update]) -> dict[str, np.ndarray]:
        """The merged arrays of the keys in ``current``: the weighted mean over the holders of each
        whole tensor (``weighting``)."""
        weights = update_weights([u.num_examples for u in updates], self.settings.weighting)
        return merge_partial(current, [u.arrays for u in updates], weights)

    def evaluate_config(self) -> dict[str, Any]:
        """What an evaluation message carries besides the global arrays (what shapes the model)."""
        return {}

    def max_blocks(self, node: int) -> int | None:
        """The most partitionable blocks ``node``'s budget allows (None: not a depth method)."""
        return None

    def phase(self) -> str | None:
        """The last round's phase, for methods that have phases."""
        return None

    def held_fraction(self) -> float | None:
        """Mean fraction of the partitionable blocks the last round's sub-models held (depth methods)."""
        return None

    def evaluation_outputs(self, model: Any) -> Any:
        """What the central evaluation scores on each batch of images, by name: ``""`` the global ``model``'s
        prediction (``loss``, ``accuracy``), any other name a part of it scored alone (``accuracy-<name>``;
        DepthFL's exits). Here: the prediction alone."""
        return lambda images: {"": model(images)}

    def inference_scales(self) -> dict[str, float]:
        """Residual scale of each partitioned block for evaluating the global model ({}: none)."""
        return {}

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        """Continue after ``completed_rounds`` rounds (sampling continues the seeded sequence)."""
        self.round_offset = int(completed_rounds)

    def summary(self) -> None:
        log(INFO, "\t├──> %s: capacity measure %s, transport %s, weighting %s", self.label,
            self.settings.capacity_measure, self.transport, self.settings.weighting)
        log(INFO, "\t└──> Sampling: fraction %.2f, min train nodes %d, min available %d, seed %d",
            self.sampler.fraction, self.sampler.min_nodes, self.sampler.min_available_nodes, self.sampler.seed)

    # -- the round ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes, plan each one's sub-model and send it its arrays and what it needs."""
        if self.keys is not None and (missing := sorted(set(self.keys) - set(arrays))):
            raise ValueError(f"the global record lacks {len(missing)} model keys, e.g. {missing[:3]}")
        run_round = self.round_offset + server_round
        sampled, self.connected, rng = self.sampler.sample(grid, run_round)
        self.sampled = sampled
        self._global, self._grid = arrays, grid
        self.last_privacy, self.last_exposure, self.last_evaluate_metrics = {}, {}, {}
        self.plans = self.plans_for(sampled, run_round, rng, server_round)
        stamp = {**config, SERVER_ROUND: server_round, RUN_ROUND: run_round, TRANSPORT: self.transport}
        views = {k: array_view(v) for k, v in arrays.items()}
        encoded: dict[tuple[str, Hashable], Any] = {}  # each array (or cut) encoded once, whatever its holders
        self._sent_arrays, messages = {}, []
        for node, plan in self.plans.items():
            cut = {k: views[k] if index is None else np.require(views[k][index], requirements="C")
                   for k, index in plan.holding.items()}
            payload = ArrayRecord()
            for key, values in cut.items():
                slot = (key, None if plan.holding[key] is None else plan.group)
                if slot not in encoded:
                    encoded[slot] = arrays[key] if plan.holding[key] is None and self.transport == "float32" \
                        else array_of(encode_array(values, self.transport))
                payload[key] = encoded[slot]
            self._sent_arrays[node] = cut
            content = RecordDict({"arrays": payload, "config": ConfigRecord({**stamp, **plan.config})})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        if self.plans:
            log(INFO, "configure_train: round %d (%s), %d of %d nodes, %s", server_round, self.phase() or self.label,
                len(self.plans), self.connected, self.describe(sampled))
        self._messages = messages  # the Grid gives them their message ids when it pushes them
        return messages

    def plans_for(self, sampled: list[int], run_round: int, rng: np.random.Generator,
                  server_round: int) -> dict[int, Plan]:
        """The method's plans; under ``over-budget='skip'`` over the sampled nodes whose budget holds the
        method's smallest sub-model (:meth:`smallest_sub_model`), decided by capacity alone before the
        method plans; the others are sent nothing."""
        if self.settings.over_budget == "skip":
            smallest = self.smallest_sub_model()
            kept = [n for n in sampled if self.affords(n, *smallest) is not False]
            self.last_skipped = len(sampled) - len(kept)
            if self.last_skipped:
                skipped = sorted({self.sampler.capacity(n) for n in sampled if n not in kept})
                log(INFO, "round %d: over-budget='skip': %d sampled node(s) of capacity %s cannot afford %s's "
                    "smallest sub-model and are sent nothing", server_round, self.last_skipped, skipped,
                    self.label)  # no ids: a secret sample stays secret
            sampled = kept
        return self.plan(sampled, run_round, rng, server_round) if sampled else {}

    def smallest_sub_model(self) -> tuple[float, Cost | None]:
        """``(share, cost)`` of the smallest sub-model the method can give a node (what ``over-budget='skip'``
        checks a budget against): here the full model; each method with smaller ones says which."""
        return 1.0, self.costs.full if self.costs is not None else None

    def affords(self, node: int, share: float, cost: Cost | None) -> bool | None:
        """Whether ``node``'s budget holds a sub-model of ``share`` and ``cost`` (:func:`~resist_fl.core.
        model_cost.fits`; None when the cost is not measured)."""
        measure = self.settings.capacity_measure
        if measure != "blocks" and cost is None:
            return None
        return fits(self.sampler.capacity(node), measure, share, cost, self.costs.full if self.costs else None)

    def fits_budget(self, node: int, plan: Plan) -> bool | None:
        """Whether ``plan`` is within ``node``'s budget (None when its cost is not measured)."""
        return self.affords(node, plan.share, plan.cost)

    def describe(self, sampled: list[int]) -> str:
        """What the round's log line says of the plans."""
        if any(p.width_rate is not None for p in self.plans.values()):
            return f"width rates {[self.plans[n].width_rate for n in sampled if n in self.plans]}"
        return f"sub-network depths {[self.plans[n].blocks for n in sampled if n in self.plans]}"

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, merge the accepted ones over their holders, return the new global record."""
        screened = self.screen(server_round, replies)
        settled = self.settle(server_round, screened, {a.node_id: self.plans[a.node_id] for a in screened.accepted})
        if too_few_replies(server_round, len(settled.accepted), self.settings.min_train_replies):
            return None, MetricRecord(settled.metrics)
        touched = set().union(*(u.arrays for u in settled.updates)) if settled.updates else set()
        current = {k: array_view(self._global[k]) for k in self._global if k in touched}
        return self.finish(server_round, settled, current, self.merge(current, settled.updates))

    # -- the public steps a wrapper recomposes ---------------------------------------------------
    def screen(self, server_round: int, replies: Iterable[Message], check=None) -> ScreenedReplies:
        """Every reply through the one screening: first reply per message, the arrays the node was
        sent (names, shapes, dtypes), finite values, bounded metrics; ``check`` (a wrapper's)
        rejects more."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        shapes = {n: {k: (tuple(v.shape), self._global[k].dtype) for k, v in cut.items()}
                  for n, cut in self._sent_arrays.items()}
        return screen_replies(server_round, replies, {n: p.keys for n, p in self.plans.items()}, self._global,
                              self.settings.max_num_examples, messages=self._messages, order=self.sampler.rank,
                              transport=self.transport, shapes=shapes, check=check, private=self.private)

    @property
    def global_record(self) -> ArrayRecord | None:
        """The global arrays the current round started from."""
        return self._global

    def received(self, node: int) -> dict[str, np.ndarray]:
        """The arrays ``node`` was sent this round (decoded, as the server holds them)."""
        return self._sent_arrays.get(node, {})

    def settle(self, server_round: int, screened: ScreenedReplies, holding: Mapping[int, Plan],
               holders_by_dealing: bool = False) -> Settled:
        """The round's metrics, the keys withheld under ``privacy-min-holders``, exposure over
        ``holding`` (the plans whose updates the merge aggregates), measured speeds and the updates.
        A key is withheld when fewer than ``privacy-min-holders`` accepted replies hold it, or, with
        ``holders_by_dealing`` (central DP), fewer than that many nodes were sent it: then which keys
        move never depends on which replies were valid."""
        accepted = screened.accepted
        dealt = {n: p.keys for n, p in self.plans.items()}
        withheld = too_few_holders(dealt, dealt if holders_by_dealing else
                                   {a.node_id: tuple(a.update) for a in accepted}, self.min_holders)
        metrics = {**screened.round_metrics(), "num-subnetworks": len(self.plans), "merge-refused": 0,
                   **self.plan_metrics()}
        if self.settings.over_budget == "skip":
            metrics["skipped-over-budget"] = self.last_skipped
        if self.min_holders > 1:
            metrics["withheld-keys"] = len(withheld)
            metrics["withheld-blocks"] = self.withheld_blocks(withheld)
            if withheld:
                log(WARNING, "round %d: %d keys (%d blocks) have fewer than privacy-min-holders = %d %s "
                    "holders: they keep their previous values", server_round, len(withheld),
                    metrics["withheld-blocks"], self.min_holders, "dealt" if holders_by_dealing else "accepted")
        shapes = {k: tuple(self._global[k].shape) for k in self._global}
        found = exposure(shapes, {n: {k: i for k, i in p.holding.items() if k not in withheld}
                                  for n, p in holding.items()}, self.exposure_threshold)
        self.last_privacy.update({"min-holders": found.min_holders, "exposed-fraction": found.exposed_fraction})
        self.last_exposure = dict(found.nodes)
        self.last_round_metrics = metrics
        self.last_replies = {a.node_id: {k: v for k, v in a.metrics.items() if k != "labels-held"} for a in accepted}
        self.record_speeds(accepted)
        updates = [Update(a.node_id, self.plans[a.node_id], {k: v for k, v in a.update.items() if k not in withheld},
                          a.num_examples, a.metrics.get("labels-held")) for a in accepted]
        return Settled(metrics, updates, withheld, accepted)

    def finish(self, server_round: int, settled: Settled, current: Mapping[str, np.ndarray],
               merged: Mapping[str, np.ndarray]) -> tuple[ArrayRecord | None, MetricRecord]:
        """The server step, the non-finite refusal, and the new global record."""
        merged = server_step(current, merged, self.settings.server_lr)
        metrics = settled.metrics
        metrics["merge-seconds"] = time.perf_counter() - settled.started
        if refuse_non_finite(server_round, merged, metrics):
            return None, MetricRecord(metrics)
        return with_arrays(self._global, merged), MetricRecord(metrics)

    def client_tiers(self) -> dict[int, Hashable]:
        """The sub-model each identified partition's node would run, by partition id, as a tier that
        :meth:`tier_model` builds (a width method's rate, DepthFL's exits, the depth prefix's blocks;
        ``{}``: its nodes run the global model)."""
        return {}

    def tier_model(self, tier: Hashable, state: Mapping[str, Any]) -> Any:
        """The sub-model of ``tier`` (a value of :meth:`client_tiers`) with the global ``state``'s values
        (a ``torch.nn.Module`` on the CPU, in evaluation as its node would run it)."""
        raise NotImplementedError(f"{self.label} has no client tiers")

    def plan_metrics(self) -> dict[str, float | int]:
        """Round metrics a method adds about its plans (ResIST: ``untrained-blocks``)."""
        return {}

    def withheld_blocks(self, withheld: set[str]) -> int:
        """How many of the method's blocks the withheld keys touch (depth methods)."""
        return 0

    def record_speeds(self, accepted: Sequence[Accepted]) -> None:
        """Each accepted node's measured speed: blocks per second of (possibly slowed) training."""
        sent_ids = {m.metadata.dst_node_id: m.metadata.message_id for m in self._messages}
        for reply in accepted:
            blocks = self.plans[reply.node_id].blocks
            if blocks:
                self.speeds[reply.node_id] = blocks / self.measured_seconds(reply, sent_ids.get(reply.node_id, ""))

    def measured_seconds(self, reply: Accepted, message_id: str) -> float:
        """The seconds a node's training took, as far as the server can tell: the time the server
        observed from pushing its message to pulling its reply (when the Grid is a
        :class:`~resist_fl.flower.metering.MeteredGrid`), or the node's own ``train-seconds`` if
        that is longer (a node may only claim to be slower than observed), at least
        :data:`MIN_TRAIN_SECONDS`."""
        observed = self._grid.observed_seconds(message_id) if isinstance(self._grid, MeteredGrid) else None
        claimed = float(reply.metrics.get("train-seconds", 0.0))
        return max(observed or 0.0, claimed, MIN_TRAIN_SECONDS)

    # -- the report -------------------------------------------------------------------------------
    def round_report(self) -> RoundReport:
        """The last round: reply counts and figures, and per node what it was sent and its reply."""
        nodes = {n: self.node_report(n) for n in self.plans}
        return RoundReport(dict(self.last_round_metrics), nodes, self.phase(), self.held_fraction(),
                           client_evaluation=dict(self.last_evaluate_metrics), privacy=dict(self.last_privacy))

    def node_report(self, node: int) -> NodeReport:
        """What ``node`` was sent, its reply, what that cost and whether it fit its budget."""
        plan = self.plans[node]
        capacity, measure = self.sampler.capacity(node), self.settings.capacity_measure
        full = self.costs.full if self.costs is not None else None
        fit = self.fits_budget(node, plan)
        low, share = self.last_exposure.get(node, (None, None))
        return NodeReport(plan.blocks, self.last_replies.get(node, {}), self.speeds.get(node), self.max_blocks(node),
                          None if fit is None else not fit, plan.cost.flops if plan.cost else None,
                          plan.cost.params if plan.cost else None, plan.width_rate, min_holders=low,
                          exposed_fraction=share, global_width=plan.global_width,
                          budget_used=budget_used(capacity, measure, plan.share, plan.cost, full))

    # -- federated evaluation ---------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """With ``fraction-evaluate`` > 0 (methods whose nodes hold the global model): the global
        model, with what shapes it, to a seeded sample of the nodes (its own stream)."""
        if self.settings.fraction_evaluate <= 0:
            self._evaluate_messages = []
            return []
        ordered = self.sampler.stable_order(grid, list(grid.get_node_ids()))
        run_round = self.round_offset + server_round
        picked = sample_positions(len(ordered), self.settings.fraction_evaluate, self.settings.min_train_nodes,
                                  round_rng(self.settings.seed + EVALUATION_STREAM, run_round))
        config = ConfigRecord({**config, SERVER_ROUND: server_round, RUN_ROUND: run_round, **self.evaluate_config()})
        content = RecordDict({"arrays": arrays, "config": config})
        self._evaluate_messages = [Message(content, dst_node_id=ordered[i], message_type=MessageType.EVALUATE)
                                   for i in picked]
        return self._evaluate_messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The example-weighted mean of the valid evaluation replies' metrics (screened like
        training replies: first reply per message, finite, bounded)."""
        valid = [RecordDict({"metrics": m}) for m in screen_evaluate_replies(
            server_round, replies, self._evaluate_messages, self.settings.max_num_examples)]
        self.last_evaluate_metrics = dict(aggregate_metricrecords(valid, "num-examples")) if valid else {}
        return MetricRecord(self.last_evaluate_metrics) if valid else None
