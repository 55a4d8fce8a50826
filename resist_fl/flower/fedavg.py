"""Flower's own FedAvg with ResIST's node sampling and reply screening in front of it.

The averaging is Flower's (``aggregate_arrayrecords`` / ``aggregate_metricrecords``,
what ``flwr.serverapp.strategy.FedAvg`` uses). What changes, so that the
comparison with ResIST differs in the strategy and nothing else:

- nodes are sampled by :class:`resist_fl.flower.node_sampling.NodeSampler`, the same
  reproducible sampler ResIST uses (Flower's draws from the global ``random``);
- only replies that pass :func:`resist_fl.flower.reply_screening.screen_replies` are
  averaged, in a fixed node order: a malformed reply is dropped with a WARNING
  instead of ending the run (Flower raises ``InconsistentMessageReplies``) or
  writing NaN into the global model;
- integer buffers stay integer (Flower's mean turns them into float64), and a
  merge that is not finite is refused (the global model is kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.width_slicing import sliced_spec
from resist_fl.core.aggregation import cast_mean, check_server_lr, server_step
from resist_fl.core.holders import exposure, key_holders, whole
from resist_fl.core.model_cost import CAPACITY_MEASURES, CostModel
from resist_fl.core.transport import check_transport
from resist_fl.flower.array_codec import array_of, array_view
from resist_fl.flower.central_dp import BELOW_CLIP, CentralDP
from resist_fl.flower.message_keys import DP_CLIP, RUN_ROUND, SERVER_ROUND, TRANSPORT
from resist_fl.flower.node_sampling import NodeSampler
from resist_fl.flower.reply_screening import (
    encoded_record,
    refuse_non_finite,
    screen_evaluate_replies,
    screen_replies,
    too_few_replies,
)
from resist_fl.flower.round_report import NodeReport, RoundReport
from resist_fl.flower.width_sliced import WIDTH_RATE
from resist_fl.flower.method_factory import Built, ModelParts, central_dp
from resist_fl.run.settings import RunSettings, parse_profile


class ScreenedFedAvg(FedAvg):
    """FedAvg with reproducible sampling and validated replies.

    Parameters
    ----------
    seed : int
        Node sampling is a function of (seed, round).
    server_lr : float
        Server step: the global model moves this fraction of the way to the average
        (1.0, the default, is FedAvg).
    transport : str
        How float arrays of training messages and replies travel
        (:data:`~resist_fl.core.transport.TRANSPORT_DTYPES`); the average and the
        global model stay float32.
    min_train_replies : int
        With fewer valid replies, the round leaves the global model unchanged.
    max_num_examples : int
        Replies claiming more examples are rejected.
    dp : CentralDP, optional
        Client-level central DP (DP-FedAvg): the same clipping check, noisy merge (every key is
        held by every sampled node, so the noise is ``z * C / n``) and accountant as ResIST's;
        the mean is uniform.
    private : bool
        The nodes train under DP (``dp='local'``; implied by ``dp``): their replies carry no loss
        or times, and the round's metrics hold reply counts only.
    exposure_threshold : int
        ``exposed-fraction`` counts the updates merged over fewer nodes than this (default 2).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    label = "fedavg"
    """The ``strategy`` column of what a recorder writes."""

    def __init__(self, *, seed: int = 0, min_train_replies: int = 1,
                 max_num_examples: int = 10_000_000, server_lr: float = 1.0, transport: str = "float32",
                 costs: CostModel | None = None, capacity_measure: str = "blocks", width_rate: float | None = None,
                 dp: CentralDP | None = None, exposure_threshold: int = 2, private: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.dp, self.exposure_threshold = dp, max(2, exposure_threshold)
        self.private = private or dp is not None  # DP replies carry no loss or times (local DP too)
        self.last_privacy: dict[str, Any] = {}
        self.last_exposure: dict[int, tuple[int, float]] = {}
        self._connected = 0
        self.width_rate = width_rate  # fedavg-small: every node trains the model of this width
        if width_rate is not None:
            self.label = "fedavg-small"
        if capacity_measure not in CAPACITY_MEASURES:
            raise ValueError(f"capacity_measure = {capacity_measure!r}: expected one of {', '.join(CAPACITY_MEASURES)}")
        self.costs, self.capacity_measure = costs, capacity_measure
        check_transport(transport)
        self.transport = transport
        check_server_lr(server_lr)
        self.server_lr = server_lr
        self.sampler = NodeSampler(fraction=self.fraction_train, min_nodes=self.min_train_nodes,
                                   min_available_nodes=self.min_available_nodes, seed=seed,
                                   secret=dp is not None and dp.secret)
        self.round_offset = 0  # rounds done before this start() (resume_after)
        self.min_train_replies = min_train_replies
        self.max_num_examples = max_num_examples
        self.last_round_metrics: dict[str, float | int] = {}
        self.last_evaluate_metrics: dict[str, float | int] = {}
        self.last_replies: dict[int, dict[str, float | int]] = {}  # node -> accepted reply's metrics
        self._global: ArrayRecord | None = None
        self._messages: list[Message] = []
        self._evaluate_messages: list[Message] = []
        self.rates_seen: set[float] = set()  # widths to evaluate the global model at: none (it is one width)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the whole model to the sampled nodes (one shared RecordDict, as FedAvg does)."""
        run_round = self.round_offset + server_round
        sampled, connected, _ = self.sampler.sample(grid, run_round)
        self._connected = connected
        if self.dp is not None:
            self.dp.stop_if_exceeded(len(sampled), connected, run_round)
        log(INFO, "configure_train: round %d, %d of %d nodes", server_round, len(sampled), connected)
        config = ConfigRecord({**config, SERVER_ROUND: server_round, RUN_ROUND: run_round, TRANSPORT: self.transport})
        if self.dp is not None:  # every node clips its update to this norm; the server checks it
            config[DP_CLIP] = self.dp.clip
        if self.width_rate is not None:  # the global model is the width-r model: nodes build that model
            config[WIDTH_RATE] = self.width_rate
        self.last_evaluate_metrics = {}  # this round's federated evaluation comes after its training
        record = RecordDict({self.arrayrecord_key: encoded_record(arrays, self.transport),
                             self.configrecord_key: config})
        self._global = arrays
        self._messages = list(self._construct_messages(record, sampled, MessageType.TRAIN))
        return self._messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies with Flower's FedAvg aggregation."""
        keys = tuple(self._global.keys())
        sent = {m.metadata.dst_node_id: keys for m in self._messages}
        screened = screen_replies(server_round, replies, sent, self._global, self.max_num_examples,
                                  messages=self._messages, order=self.sampler.rank, transport=self.transport,
                                  check=self.dp.reply_check(self._global) if self.dp is not None else None,
                                  private=self.private)
        self.last_round_metrics = {**screened.round_metrics(), "merge-refused": 0}
        self.last_replies = {a.node_id: dict(a.metrics) for a in screened.accepted}
        holding = sent if self.dp is not None else {a.node_id: keys for a in screened.accepted}
        found = exposure({k: tuple(self._global[k].shape) for k in keys},
                         {n: whole(held) for n, held in holding.items()}, self.exposure_threshold)
        self.last_privacy = {"min-holders": found.min_holders, "exposed-fraction": found.exposed_fraction}
        self.last_exposure = dict(found.nodes)
        if self.dp is None and too_few_replies(server_round, len(screened.accepted), self.min_train_replies):
            return None, MetricRecord(self.last_round_metrics)  # under DP every round is released (see ResIST)
        contents = [a.content() for a in screened.accepted]
        if self.dp is not None:  # DP-FedAvg: every key held by every sampled node
            current = {k: array_view(self._global[k]) for k in keys}
            merged = self.dp.merge(current, [a.update for a in screened.accepted], key_holders(sent))
            self.last_privacy.update(self.dp.release_row(
                [self.sampler.key(n) for n in sent], self._connected,
                [int(a.metrics[BELOW_CLIP]) for a in screened.accepted if BELOW_CLIP in a.metrics]))
        else:
            averaged = aggregate_arrayrecords(contents, self.weighted_by_key)
            merged = {k: cast_mean(array_view(averaged[k]), self._global[k].dtype) for k in self._global.keys()}
        if self.server_lr != 1.0:
            merged = server_step({k: array_view(self._global[k]) for k in merged}, merged, self.server_lr)
        if refuse_non_finite(server_round, merged, self.last_round_metrics):
            return None, MetricRecord(self.last_round_metrics)
        # under DP the replies' metrics are node data no noise covers: the counts only
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents and not self.private else {}
        record = ArrayRecord({k: array_of(v) for k, v in merged.items()})
        return record, MetricRecord({**metrics, **self.last_round_metrics})

    def round_report(self) -> RoundReport:
        """The last round: reply counts and figures, and per node its accepted reply's metrics
        (every node trains the full model), and the round's federated evaluation if any."""
        nodes = {m.metadata.dst_node_id: self.node_report(m.metadata.dst_node_id) for m in self._messages}
        return RoundReport(dict(self.last_round_metrics), nodes, client_evaluation=dict(self.last_evaluate_metrics),
                           privacy=dict(self.last_privacy))

    def node_report(self, node: int) -> NodeReport:
        """What ``node`` was sent (the full model), its reply and what that cost: over capacity
        whenever its capacity is below the full model's cost (under a measured capacity)."""
        reply = self.last_replies.get(node, {})
        low, share = self.last_exposure.get(node, (None, None))
        epsilon = self.dp.node_epsilon(self.sampler.key(node)) if self.dp is not None else None
        if self.costs is None:
            return NodeReport(None, reply, min_holders=low, exposed_fraction=share, epsilon=epsilon)
        rate = 1.0 if self.width_rate is None else self.width_rate
        cost = self.costs.width_cost(rate) if rate < 1 else self.costs.full
        capacity = self.sampler.capacity(node)
        if self.capacity_measure == "blocks":
            over = rate > capacity + 1e-9 if self.width_rate is not None else None
        else:
            over = cost.of(self.capacity_measure) > capacity * self.costs.full.of(self.capacity_measure) * (1 + 1e-9)
        return NodeReport(None, reply, over_capacity=over, flops_per_sample=cost.flops, params=cost.params,
                          width_rate=self.width_rate, min_holders=low, exposed_fraction=share, epsilon=epsilon)

    def inference_scales(self) -> dict[str, float]:
        """FedAvg trains the full model: no block is scaled."""
        return {}

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        """Continue after ``completed_rounds`` rounds (sampling continues the seeded sequence; under
        DP the accountant continues from the last row's ``dp-state``)."""
        self.round_offset = int(completed_rounds)
        if self.dp is not None and last_row:
            self.dp.restore(last_row.get("dp-state"))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's federated-evaluation sampling; the messages carry what shapes the model (the
        width of fedavg-small) and are kept, so that every reply is screened against them."""
        config = ConfigRecord(dict(config))
        if self.width_rate is not None:
            config[WIDTH_RATE] = self.width_rate
        self._evaluate_messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._evaluate_messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Federated evaluation: the example-weighted mean of the valid replies' metrics (the
        same first-reply-per-message rule as training replies)."""
        valid = [RecordDict({"metrics": m}) for m in
                 screen_evaluate_replies(server_round, replies, self._evaluate_messages, self.max_num_examples)]
        self.last_evaluate_metrics = dict(self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key)) if valid else {}
        return MetricRecord(self.last_evaluate_metrics) if valid else None


def _from_settings(settings: RunSettings, model: ModelParts, width_rate: float | None) -> Built:
    strategy = ScreenedFedAvg(width_rate=width_rate, fraction_train=settings.fraction_train,
                              fraction_evaluate=settings.fraction_evaluate, min_train_nodes=settings.min_train_nodes,
                              min_evaluate_nodes=settings.min_train_nodes if settings.fraction_evaluate else 0,
                              min_available_nodes=settings.min_available_nodes,
                              min_train_replies=settings.min_train_replies,
                              max_num_examples=settings.max_num_examples, seed=settings.seed,
                              server_lr=settings.server_lr, transport=settings.transport_dtype, costs=model.costs,
                              capacity_measure=settings.capacity_measure, dp=central_dp(settings),
                              exposure_threshold=max(2, settings.privacy_min_holders),
                              private=settings.dp != "none")
    return Built(strategy, model)


def from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='fedavg'``: Flower's FedAvg of the full model (the method table's factory)."""
    return _from_settings(settings, model, None)


def small_from_settings(settings: RunSettings, model: ModelParts) -> Built:
    """``strategy='fedavg-small'``: FedAvg of the one width that fits the weakest capacity of
    ``capacity-profile`` (1.0 without one); that narrower model becomes the global model."""
    profile = parse_profile("capacity-profile", settings.capacity_profile, low=0.0, high=1.0)
    rate = model.costs.max_rate(min(profile, default=1.0), settings.capacity_measure, settings.rates())
    spec = sliced_spec(model.spec, rate)
    layout = BlockLayout.from_spec(spec, settings.stages())
    return _from_settings(settings, ModelParts(spec, layout, model.costs), rate)
