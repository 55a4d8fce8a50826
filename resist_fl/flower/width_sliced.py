"""HeteroFL and FedRolex as Flower strategies: width-sliced sub-models of the pre-activation ResNet.

Thin classes over the shared round (:class:`~resist_fl.flower.round_skeleton.SubModelStrategy`:
the same node sampling, reply screening, metering, transport, central-DP wrapper and round report as
:class:`~resist_fl.flower.resist.ResIST`) and :mod:`resist_fl.core.width_slicing`:

- ``heterofl`` (Diao, Ding, Tarokh, ICLR 2021): a node of capacity c trains the first ``r * C``
  channels of every layer, r the largest rate of ``rates`` whose sub-model fits its budget
  (:meth:`~resist_fl.core.model_cost.CostModel.max_rate`) — static tiers; while training, its
  ClientApp divides the input of every normalisation layer by r (HeteroFL's *scaler*, where its code
  puts it: :mod:`resist_fl.node.width_scaler`), which a norm with batch statistics cancels;
- ``fedrolex`` (Alam et al., NeurIPS 2022): the same rates, but the kept channels are a window
  whose start advances by one channel every round (wrapping around; its code rolls the other way,
  ``resnet_server.py`` lines 98-110 of AIoT-MLSys-Lab/FedRolex, the same windows in another order);
  no scaler (its code has one: ``models/resnet.py`` lines 45, 48, 151, which before BatchNorm with
  batch statistics cancels); with ``fedrolex-overlap`` its code's ``overlap`` option (shifted windows
  per node over a random channel order per round); the label split as HeteroFL's;
- ``fjord`` (Horváth et al., NeurIPS 2021): FjORD's own width levels (``fjord-levels``, 0.2 .. 1.0
  as in its code, ``baselines/fjord/fjord/conf/common.yaml`` lines 33-38 of adap/flower); the node
  gets the largest level its budget fits (its code assigns the maximum level by client id,
  ``main.py`` lines 189-190: here the budget decides) as a nested sub-model (prefix, like HeteroFL,
  no scaler) and trains, for every local batch, the nested sub-model of a level drawn uniformly from
  those at or below its own (ordered dropout, :mod:`resist_fl.node.ordered_dropout`); it returns its
  largest sub-model. ``fjord-kd`` adds the paper's self-distillation (``models.py`` lines 251-258):
  each batch also trains the node's largest level on the labels, whose detached softmax is the
  sampled level's target. A level's sub-model has ``round(p x base-width)`` channels in the first
  stage and the stages' ratios after it (FjORD's code takes ``ceil(p x C)`` of each layer,
  ``od/layers/conv.py`` lines 28-36: at base width 8 its levels keep 2/4/5/7/8 channels, these 2/3/5/6/8).

Every element of every global tensor becomes the weighted mean over the nodes whose sub-model held
it (:func:`~resist_fl.core.width_slicing.merge_sliced`); elements nobody held stay. The weights are
the run's ``weighting`` (default ``examples``, as for every method here); both official codes take the
plain mean over the clients that held the element: HeteroFL's ``Federation.combine`` adds 1 to a count
per holder and divides by it (``src/fed.py`` lines 180-253, the ResNet branch from 219, of
diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients
at ea528c3); FedRolex (AIoT-MLSys-Lab/FedRolex at 8135109) weights a convolution by ``K = 1`` under its
default ``--weighting avg`` (``main_resnet.py`` line 37, ``resnet_server.py`` lines 180-194) and every
other tensor (norms, classifier) by its element's update count (lines 170-177, 196-215). Those counts were
meant to be fixed within a round, but ``self.tmp_counts = tmp_counts_cpy`` (line 218) sits inside the loop
over tensors, so from the second tensor on each holder's ``+= 1`` reaches the next holder's weight: a
norm or classifier element held by m nodes in a round is weighted c, c+1, ..., c+m-1 in the order of the
sampled nodes, c its count before the round. ``weighting='uniform'`` gives the plain mean this was meant to
be; the difference is a weight spread of about (m-1)/c that shrinks as counts grow (deviation, stated in
docs/heterogeneous.md). The message
carries the width rate (``width-rate``) and whether to scale (``width-scaler``); a node builds the
sliced model directly from its spec (:func:`~resist_fl.core.width_slicing.sliced_spec`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.common import log

from resist_fl.core.aggregation import update_weights
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.model_cost import Cost, CostModel
from resist_fl.core.width_slicing import (
    whole_channels,
    element_index,
    key_groups,
    merge_sliced,
    overlapping_windows,
    prefix_indices,
    rolling_indices,
    slice_state,
    sliced_spec,
)
from resist_fl.flower.message_keys import FJORD_DISTILL, FJORD_RATES, LABEL_SPLIT, WIDTH_RATE, WIDTH_SCALER
from resist_fl.flower.method_factory import Built, ModelParts
from resist_fl.flower.round_skeleton import Plan, SubModelStrategy, Update
from resist_fl.run.settings import RunSettings, settings_of


ROLEX_STREAM = 0x0_5011E
"""Seeds the per-round channel order of ``fedrolex-overlap`` apart from every other draw of a round."""
CLASSIFIER = ("linear.weight", "linear.bias")
"""The classifier's keys in the pre-activation family (rows: one per label)."""
LABELS = "labels"
"""The index group of the classifier's rows in a label-split merge."""


def label_rows(update: Update, classes: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``update``'s arrays and index sets for a label-split merge: its classifier rows cut to the labels
    its node holds (all of them when it did not say; labels beyond ``classes`` ignored)."""
    held = np.arange(classes) if update.labels is None else np.array([c for c in update.labels if c < classes],
                                                                        dtype=np.int64)
    arrays = {k: np.take(v, held, axis=0) if k in CLASSIFIER else v for k, v in update.arrays.items()}
    return arrays, {**update.plan.indices, LABELS: held}


class WidthSliced(SubModelStrategy):
    """The round of every width-sliced method: a node's sub-model is the channels :meth:`indices_for`
    keeps at the largest rate its budget allows, trained as :meth:`node_config` says; merged
    element-wise over the nodes that held each element. :class:`HeteroFL`, :class:`FedRolex` and
    :class:`FjORD` override one hook each (Flower's ``FedProx(FedAvg)`` is the shape).

    Parameters
    ----------
    spec : ModelSpec
        The global model (pre-activation family).
    costs : CostModel
        Its measured costs: each node's rate is the largest of ``width-rates`` within its capacity.
    keys : iterable of str
        The global record's keys (the model's payload keys).
    settings : RunSettings, optional
        The run's values (default: RunSettings' defaults); besides the shared round's, ``width-rates``.
    **overrides
        RunSettings fields to change.
    """

    label = "width-sliced"
    """The ``strategy`` name (each subclass's own): what a recorder writes."""

    @classmethod
    def from_settings(cls, settings: RunSettings, model: ModelParts) -> Built:
        """The method table's factory of each width-sliced method."""
        return Built(cls(model.spec, model.costs, model.layout.payload_keys(), settings), model)

    def __init__(self, spec: ModelSpec, costs: CostModel, keys: Iterable[str], settings: RunSettings | None = None,
                 **overrides: Any) -> None:
        settings = settings_of(settings, overrides)
        super().__init__(tuple(keys), settings, costs)
        self.rates = tuple(sorted(set(self.candidate_rates(settings)), reverse=True))
        self.spec = spec
        self.groups = key_groups(spec, self.keys)
        self.blocks = len(costs.layout.partitionable)

    def client_tiers(self) -> dict[int, float]:
        """Each partition's width rate: the largest its node's capacity allows (its prefix is what it runs)."""
        measure = self.settings.capacity_measure
        return {p: self.costs.max_rate(c, measure, self.rates) for p, c in self.sampler.partition_capacities().items()}

    def tier_model(self, tier: float, state: Mapping[str, Any]) -> torch.nn.Module:
        model = build_model(sliced_spec(self.spec, tier))
        model.load_state_dict(prefix_state(self.spec, state, tier))
        return model

    def smallest_sub_model(self) -> tuple[float, Cost | None]:
        """The smallest of the method's widths."""
        return min(self.rates), self.costs.width_cost(min(self.rates))

    def rate_of(self, node: int) -> float:
        """The width rate of ``node``: the largest of the rates its capacity allows."""
        return self.costs.max_rate(self.sampler.capacity(node), self.settings.capacity_measure, self.rates)

    # -- what a method changes -----------------------------------------------------------------
    @staticmethod
    def candidate_rates(settings: RunSettings) -> tuple[float, ...]:
        """The widths a node may get (``width-rates``); the largest that fits its budget is its own."""
        return settings.rates()

    def indices_for(self, rate: float, run_round: int) -> dict[str, np.ndarray]:
        """The channels a sub-model of ``rate`` keeps in ``run_round``: the first ``r x C`` (a prefix)."""
        return prefix_indices(self.spec, rate)

    def node_config(self, rate: float) -> dict[str, Any]:
        """What a node of width ``rate`` needs besides the width to train as the method does."""
        return {WIDTH_SCALER: False}

    # -- the plan and the merge -------------------------------------------------------------------
    def node_windows(self, rates: Sequence[float], run_round: int) -> list[dict[str, np.ndarray]] | None:
        """Index sets of each sampled node in order, when the method gives nodes of one rate different
        channels in a round (None: :meth:`indices_for` by rate)."""
        return None

    def plan(self, sampled: list[int], run_round: int, rng: np.random.Generator, server_round: int) -> dict[int, Plan]:
        shapes = {k: tuple(self._global[k].shape) for k in self.keys}
        rates = [self.rate_of(node) for node in sampled]
        windows = self.node_windows(rates, run_round)
        shared: dict[Any, Plan] = {}  # nodes holding the same indices share one plan (arrays cut once)
        plans = {}
        for position, (node, rate) in enumerate(zip(sampled, rates)):
            group = rate if windows is None else (rate, position)
            if group not in shared:
                indices = self.indices_for(rate, run_round) if windows is None else windows[position]
                holding = {k: element_index(shapes[k], self.groups[k], indices) for k in self.keys}
                shared[group] = Plan(holding, {WIDTH_RATE: rate, **self.node_config(rate)}, share=rate,
                                     cost=self.costs.width_cost(rate), blocks=self.blocks, width_rate=rate,
                                     global_width=rate, group=group, indices=indices)
            plans[node] = shared[group]
        return plans

    label_split = False
    """Whether the method uses its code's label split (masked cross-entropy, per-label classifier rows)."""

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update]) -> dict[str, np.ndarray]:
        """HeteroFL's merge: every element the weighted mean over the updates that held it; with the
        label split, a classifier row only over the updates whose node holds that label."""
        weights = update_weights([u.num_examples for u in updates], self.settings.weighting)
        if not (self.label_split and self.settings.label_split):
            return merge_sliced(current, [(u.arrays, u.plan.indices) for u in updates], self.groups, weights)
        classes = len(current[CLASSIFIER[1]])
        groups = {**self.groups, CLASSIFIER[0]: (LABELS, *self.groups[CLASSIFIER[0]][1:]), CLASSIFIER[1]: (LABELS,)}
        return merge_sliced(current, [label_rows(u, classes) for u in updates], groups, weights)

    def max_blocks(self, node: int) -> int | None:
        return self.blocks

    def summary(self) -> None:
        log(INFO, "\t├──> %s: width rates %s", self.label, self.rates)
        super().summary()


class HeteroFL(WidthSliced):
    """HeteroFL: static width tiers (the first ``r x C`` channels); its nodes apply the scaler."""

    label = "heterofl"
    label_split = True

    def node_config(self, rate: float) -> dict[str, Any]:
        return {WIDTH_SCALER: True, LABEL_SPLIT: self.settings.label_split}


class FedRolex(WidthSliced):
    """FedRolex: the kept channels are a window whose start advances one channel per round."""

    label = "fedrolex"
    label_split = True

    def node_config(self, rate: float) -> dict[str, Any]:
        return {WIDTH_SCALER: False, LABEL_SPLIT: self.settings.label_split}

    def indices_for(self, rate: float, run_round: int) -> dict[str, np.ndarray]:
        return rolling_indices(self.spec, rate, run_round)

    def node_windows(self, rates: Sequence[float], run_round: int) -> list[dict[str, np.ndarray]] | None:
        """With ``fedrolex-overlap``: its code's shifted windows over a random channel order per round
        (:func:`~resist_fl.core.width_slicing.overlapping_windows`), drawn from ``seed`` and the round."""
        overlap = self.settings.rolex_overlap()
        if overlap is None:
            return None
        rng = np.random.default_rng([int(self.settings.seed), int(run_round), ROLEX_STREAM])
        return overlapping_windows(self.spec, rates, overlap, rng)


class FjORD(WidthSliced):
    """FjORD: the largest nested level that fits; per local batch a level at or below the node's own."""

    label = "fjord"
    distill = False

    @staticmethod
    def candidate_rates(settings: RunSettings) -> tuple[float, ...]:
        return tuple(whole_channels(p, settings.base_width) for p in settings.fjord_rates())

    def node_config(self, rate: float) -> dict[str, Any]:
        return {WIDTH_SCALER: False, FJORD_RATES: sorted(r for r in self.rates if r <= rate),
                FJORD_DISTILL: self.distill}


class FjORDDistilled(FjORD):
    """FjORD with self-distillation (``fjord-kd``): the node's largest level teaches the sampled one."""

    label = "fjord-kd"
    distill = True


def prefix_state(spec: ModelSpec, state: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """The first ``r x C`` channels of every tensor of the global ``state`` (HeteroFL's tier of ``rate``)."""
    arrays = {k: v.numpy() for k, v in state.items()}
    cut = slice_state(arrays, key_groups(spec, list(arrays)), prefix_indices(spec, rate))
    return {k: torch.from_numpy(v) for k, v in cut.items()}
