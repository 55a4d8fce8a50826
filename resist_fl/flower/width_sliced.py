"""HeteroFL and FedRolex as Flower strategies: width-sliced sub-models of the pre-activation ResNet.

A thin adapter over :mod:`resist_fl.core.width_slicing`, beside :class:`~resist_fl.flower.resist.ResIST`
and behind the same node sampling, reply screening, metering, transport and round report:

- ``heterofl`` (Diao, Ding, Tarokh, ICLR 2021): a node of capacity c trains the first ``r * C``
  channels of every layer, r the largest rate of ``rates`` whose sub-model fits its budget
  (:meth:`~resist_fl.core.model_cost.CostModel.max_rate`) — static tiers; its ClientApp divides
  every convolution's output by r while training (HeteroFL's *scaler*);
- ``fedrolex`` (Alam et al., NeurIPS 2022): the same rates, but the kept channels are a window
  whose start advances by one channel every round (wrapping around); no scaler;
- ``fjord`` (Horváth et al., NeurIPS 2021): the node gets its largest nested sub-model (prefix,
  like HeteroFL, no scaler) and trains, for every local batch, the nested sub-model of a width
  drawn uniformly from the rates at or below its own (ordered dropout,
  :mod:`resist_fl.node.ordered_dropout`; the variant without self-distillation); it returns its
  largest sub-model.

Every element of every global tensor becomes the weighted mean over the nodes whose sub-model held
it (:func:`~resist_fl.core.width_slicing.merge_sliced`); elements nobody held stay. The message
carries the width rate (``width-rate``) and whether to scale (``width-scaler``); a node builds the
sliced model directly from its spec (:func:`~resist_fl.core.width_slicing.sliced_spec`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from resist_fl.core.aggregation import update_weights
from resist_fl.core.model import ModelSpec
from resist_fl.core.model_cost import CAPACITY_MEASURES, WIDTH_RATES, CostModel
from resist_fl.core.transport import check_transport
from resist_fl.core.holders import exposure
from resist_fl.core.width_slicing import (
    actual_rate,
    element_index,
    key_groups,
    merge_sliced,
    prefix_indices,
    rolling_indices,
    slice_state,
)
from resist_fl.flower.array_codec import array_of, array_view, with_arrays
from resist_fl.flower.message_keys import RUN_ROUND, SERVER_ROUND, TRANSPORT
from resist_fl.flower.node_sampling import NodeSampler
from resist_fl.flower.reply_screening import encoded_record, refuse_non_finite, screen_replies, too_few_replies
from resist_fl.flower.round_report import NodeReport, RoundReport
from resist_fl.flower.method_factory import Built, ModelParts
from resist_fl.run.settings import RunSettings

WIDTH_RATE = "width-rate"
"""Message key: the width rate of the sub-model the message carries."""
WIDTH_SCALER = "width-scaler"
"""Message key: whether the node divides its convolutions' outputs by the rate while training."""
FJORD_RATES = "fjord-rates"
"""Message key (FjORD): the widths a node samples from for each local batch (those at or below its own)."""


class WidthSliced(Strategy):
    """The round of every width-sliced method: a node's sub-model is the channels :meth:`indices_for`
    keeps at the largest rate its budget allows, trained as :meth:`node_config` says; merged
    element-wise over the nodes that held each element. :class:`HeteroFL`, :class:`FedRolex` and
    :class:`FjORD` override one hook each (Flower's ``FedProx(FedAvg)`` is the shape).

    Parameters
    ----------
    spec : ModelSpec
        The global model (pre-activation family).
    costs : CostModel
        Its measured costs: each node's rate is the largest of ``rates`` within its capacity.
    keys : sequence of str
        The global record's keys (the model's payload keys).
    rates, capacity_measure
        See the module docstring; ``capacity_measure`` as for ResIST.
    fraction_train, min_train_nodes, min_available_nodes, weighting, min_train_replies,
    max_num_examples, seed, transport
        As for :class:`~resist_fl.flower.resist.ResIST`.
    """

    mode = "prefix"
    """The ``strategy`` name (a subclass's); ``label`` of what a recorder writes."""

    @classmethod
    def from_settings(cls, settings: RunSettings, model: ModelParts) -> Built:
        """The method table's factory of each width-sliced method."""
        return Built(cls(model.spec, model.costs, model.layout.payload_keys(), rates=settings.rates(),
                         capacity_measure=settings.capacity_measure, fraction_train=settings.fraction_train,
                         min_train_nodes=settings.min_train_nodes, min_available_nodes=settings.min_available_nodes,
                         weighting=settings.weighting, min_train_replies=settings.min_train_replies,
                         max_num_examples=settings.max_num_examples, seed=settings.seed,
                         transport=settings.transport_dtype), model)

    def __init__(self, spec: ModelSpec, costs: CostModel, keys: Iterable[str], *,
                 rates: Iterable[float] = WIDTH_RATES, capacity_measure: str = "flops", fraction_train: float = 1.0,
                 min_train_nodes: int = 2, min_available_nodes: int = 2, weighting: str = "examples",
                 min_train_replies: int = 1, max_num_examples: int = 10_000_000, seed: int = 0,
                 transport: str = "float32") -> None:
        if capacity_measure not in CAPACITY_MEASURES:
            raise ValueError(f"capacity_measure = {capacity_measure!r}: expected one of {', '.join(CAPACITY_MEASURES)}")
        update_weights([], weighting)
        check_transport(transport)
        self.rates = tuple(sorted({actual_rate(spec, r) for r in rates}, reverse=True))
        self.spec, self.costs, self.capacity_measure = spec, costs, capacity_measure
        self.label = self.mode
        self.keys = tuple(keys)
        self.groups = key_groups(spec, self.keys)
        self.sampler = NodeSampler(fraction=fraction_train, min_nodes=min_train_nodes,
                                   min_available_nodes=min_available_nodes, seed=seed)
        self.weighting, self.min_train_replies, self.max_num_examples = weighting, min_train_replies, max_num_examples
        self.transport = transport
        self.round_offset = 0
        self.rates_seen: set[float] = set()
        self.last_rates: dict[int, float] = {}
        self.last_round_metrics: dict[str, float | int] = {}
        self.last_replies: dict[int, dict[str, float | int]] = {}
        self.last_privacy: dict[str, float | int] = {}
        self.last_exposure: dict[int, tuple[int, float]] = {}
        self._indices: dict[int, dict[str, np.ndarray]] = {}
        self._shapes: dict[int, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        self._global: ArrayRecord | None = None
        self._messages: list[Message] = []

    # -- RecordedStrategy ----------------------------------------------------------------------
    def rate_of(self, node: int) -> float:
        """The width rate of ``node``: the largest of the rates its capacity allows."""
        return self.costs.max_rate(self.sampler.capacity(node), self.capacity_measure, self.rates)

    def round_report(self) -> RoundReport:
        nodes = {}
        blocks = len(self.costs.layout.partitionable)
        for node, rate in self.last_rates.items():
            cost = self.costs.width_cost(rate)
            if self.capacity_measure == "blocks":
                over = rate > self.sampler.capacity(node) + 1e-9
            else:
                over = cost.of(self.capacity_measure) > self.sampler.capacity(node) * \
                    self.costs.full.of(self.capacity_measure) * (1 + 1e-9)
            low, share = self.last_exposure.get(node, (None, None))
            nodes[node] = NodeReport(blocks, self.last_replies.get(node, {}), max_blocks=blocks, over_capacity=over,
                                     flops_per_sample=cost.flops, params=cost.params, width_rate=rate,
                                     min_holders=low, exposed_fraction=share)
        return RoundReport(dict(self.last_round_metrics), nodes, privacy=dict(self.last_privacy))

    def inference_scales(self) -> dict[str, float]:
        """Width methods do not scale residual branches."""
        return {}

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        self.round_offset = int(completed_rounds)

    def summary(self) -> None:
        log(INFO, "\t├──> %s: width rates %s, capacity measure %s", self.mode, self.rates, self.capacity_measure)

    # -- what a method changes -----------------------------------------------------------------
    def indices_for(self, rate: float, run_round: int) -> dict[str, np.ndarray]:
        """The channels a sub-model of ``rate`` keeps in ``run_round``: the first ``r x C`` (a prefix)."""
        return prefix_indices(self.spec, rate)

    def node_config(self, rate: float) -> dict[str, Any]:
        """What a node of width ``rate`` needs besides the width to train as the method does."""
        return {WIDTH_SCALER: False}

    # -- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes; send each its width-sliced sub-model (global names, sliced shapes)."""
        if missing := sorted(set(self.keys) - set(arrays)):
            raise ValueError(f"the global record lacks {len(missing)} model keys, e.g. {missing[:3]}")
        run_round = self.round_offset + server_round
        sampled, connected, _ = self.sampler.sample(grid, run_round)
        state = {k: array_view(arrays[k]) for k in self.keys}
        self._global, self._indices, self._shapes, self.last_rates = arrays, {}, {}, {}
        cut_by_rate: dict[float, ArrayRecord] = {}
        shapes_by_rate: dict[float, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        messages = []
        for node in sampled:
            rate = self.rate_of(node)
            indices = self.indices_for(rate, run_round)
            if rate not in cut_by_rate:  # nodes of one rate share one slice (the same indices this round)
                cut = slice_state(state, self.groups, indices)
                cut_by_rate[rate] = encoded_record(ArrayRecord({k: array_of(v) for k, v in cut.items()}),
                                                   self.transport)
                shapes_by_rate[rate] = {k: (tuple(v.shape), v.dtype) for k, v in cut.items()}
            self._indices[node], self._shapes[node], self.last_rates[node] = indices, shapes_by_rate[rate], rate
            node_config = ConfigRecord({**config, SERVER_ROUND: server_round, RUN_ROUND: run_round,
                                        TRANSPORT: self.transport, WIDTH_RATE: rate, **self.node_config(rate)})
            content = RecordDict({"arrays": cut_by_rate[rate], "config": node_config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self.rates_seen |= set(self.last_rates.values())
        log(INFO, "configure_train: round %d (%s), %d of %d nodes, width rates %s", server_round, self.mode,
            len(sampled), connected, [self.last_rates[n] for n in sampled])
        self._messages = messages
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies against each node's sliced shapes; merge element-wise over holders."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        sent = {node: self.keys for node in self._indices}
        screened = screen_replies(server_round, replies, sent, self._global, self.max_num_examples,
                                  messages=self._messages, order=self.sampler.rank, transport=self.transport,
                                  shapes=self._shapes)
        metrics = {**screened.round_metrics(), "num-subnetworks": len(self._indices), "merge-refused": 0}
        self.last_round_metrics = metrics
        self.last_replies = {a.node_id: dict(a.metrics) for a in screened.accepted}
        accepted = screened.accepted
        shapes = {k: tuple(self._global[k].shape) for k in self.keys}
        found = exposure(shapes, {a.node_id: {k: element_index(shapes[k], self.groups[k], self._indices[a.node_id])
                                              for k in a.update} for a in accepted}, 2)
        self.last_privacy = {"min-holders": found.min_holders, "exposed-fraction": found.exposed_fraction}
        self.last_exposure = dict(found.nodes)
        if too_few_replies(server_round, len(accepted), self.min_train_replies):
            return None, MetricRecord(metrics)
        current = {k: array_view(self._global[k]) for k in self.keys}
        merged = merge_sliced(current, [(a.update, self._indices[a.node_id]) for a in accepted], self.groups,
                              update_weights([a.num_examples for a in accepted], self.weighting))
        if refuse_non_finite(server_round, merged, metrics):
            return None, MetricRecord(metrics)
        return with_arrays(self._global, merged), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


class HeteroFL(WidthSliced):
    """HeteroFL: static width tiers (the first ``r x C`` channels); its nodes apply the scaler."""

    mode = "heterofl"

    def node_config(self, rate: float) -> dict[str, Any]:
        return {WIDTH_SCALER: True}


class FedRolex(WidthSliced):
    """FedRolex: the kept channels are a window whose start advances one channel per round."""

    mode = "fedrolex"

    def indices_for(self, rate: float, run_round: int) -> dict[str, np.ndarray]:
        return rolling_indices(self.spec, rate, run_round)


class FjORD(WidthSliced):
    """FjORD: the largest nested sub-model; per local batch a width at or below the node's own."""

    mode = "fjord"

    def node_config(self, rate: float) -> dict[str, Any]:
        return {WIDTH_SCALER: False, FJORD_RATES: sorted(r for r in self.rates if r <= rate)}
