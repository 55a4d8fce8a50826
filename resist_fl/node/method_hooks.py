"""What a node does differently per method: the model it builds for a message, and what it runs
before each local step.

The method table names each method's hook (:attr:`resist_fl.run.methods.Method.node_hook`); the
ClientApp looks it up by the run's ``strategy`` and never branches on message keys. What shapes the
model (``blocks``, ``width-rate``, ``width-scaler``, ``fjord-rates``) travels in every message that
carries arrays, set by the strategy that sent it; a hook reads it from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.width_slicing import sliced_spec
from resist_fl.flower.message_keys import (
    BLOCKS,
    DEPTH_EXITS,
    DISTILL_WEIGHT,
    FEDDYN_ALPHA,
    FJORD_DISTILL,
    FJORD_RATES,
    LABEL_SPLIT,
    WIDTH_RATE,
    WIDTH_SCALER,
)
from resist_fl.node.feddyn_regularizer import STATE_KEY, FedDynRegularizer
from resist_fl.node.mutual_distillation import mutual_distillation
from resist_fl.node.ordered_dropout import OrderedDropout
from resist_fl.node.training import Loss
from resist_fl.node.width_scaler import attach_width_scaler


class NodeMemory(Protocol):
    """What a node keeps across the rounds of a run (the ClientApp's is Flower's ``context.state``)."""

    def load(self, name: str) -> dict[str, np.ndarray]:
        """The arrays kept under ``name`` ({} before the first :meth:`save`)."""
        ...

    def save(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep ``arrays`` under ``name`` for the node's next rounds."""
        ...


@dataclass(frozen=True)
class LocalTraining:
    """How a method's node trains differently from plain SGD on cross-entropy (None: it does not)."""

    before_step: Callable[[int], object] | None = None
    loss: Loss | None = None
    reply_metrics: dict[str, Any] = field(default_factory=dict)
    """What the training reply says besides the training figures (``labels-held``)."""
    after_training: Callable[[], object] | None = None
    """Called once the round's local steps are done (FedDyn keeps its state there)."""
    loss_terms: int = 1
    """How many outputs' losses the step loss sums (DepthFL: one per exit the node holds). The reply's
    ``train-loss`` is the mean step loss (a regulariser such as FedDyn's included) over this count, so
    that rounds whose nodes hold different numbers of exits compare (the ServerApp's divergence rule
    compares a round with the best earlier one)."""


def masked_cross_entropy(present: torch.Tensor) -> Loss:
    """HeteroFL's and FedRolex's masked loss: the logits of labels absent from the node's data set to 0
    before the cross-entropy (``out.masked_fill(label_mask == 0, 0)``, ``src/models/resnet.py`` lines
    152-157 of diaoenmao's HeteroFL code; lines 155-158 of FedRolex's)."""
    def loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(images).float()
        return torch.nn.functional.cross_entropy(logits.masked_fill(~present.to(logits.device), 0.0), labels)

    return loss


class SubNetwork:
    """ResIST, depth prefix, FedAvg: the sub-network of the message's ``blocks`` (the full model
    without), trained by plain local SGD."""

    def build(self, spec: ModelSpec, layout: BlockLayout, config: Mapping[str, Any]) -> torch.nn.Module:
        """The (untrained) model the message's arrays load into."""
        return build_model(spec) if BLOCKS not in config else layout.build_subnetwork(spec, list(config[BLOCKS]))

    def local_training(self, model: torch.nn.Module, spec: ModelSpec, config: Mapping[str, Any],
                       seed: int, labels: torch.Tensor, memory: NodeMemory | None = None) -> LocalTraining:
        """What runs before every local step, the step's loss and what the reply adds (plain SGD on
        cross-entropy here); ``labels`` are the node's training labels, ``memory`` what the node keeps
        across rounds (None: nothing)."""
        return LocalTraining()


def label_split(spec: ModelSpec, config: Mapping[str, Any], labels: torch.Tensor) -> LocalTraining:
    """With the message's ``label-split``: the masked loss over the labels ``labels`` hold, and
    ``labels-held`` in the reply; otherwise nothing."""
    if not bool(config.get(LABEL_SPLIT, False)):
        return LocalTraining()
    present = torch.zeros(spec.num_classes, dtype=torch.bool)
    present[torch.unique(labels.cpu())] = True
    held = [int(c) for c in torch.nonzero(present).flatten()]
    return LocalTraining(loss=masked_cross_entropy(present), reply_metrics={"labels-held": held})


class WidthSlice(SubNetwork):
    """HeteroFL, FedRolex, fedavg-small: the model of the message's ``width-rate``, built at that width
    directly; with ``width-scaler`` the input of its norms is divided by the rate while training
    (HeteroFL's scaler); with ``label-split`` the masked loss (:func:`label_split`)."""

    def build(self, spec: ModelSpec, layout: BlockLayout, config: Mapping[str, Any]) -> torch.nn.Module:
        rate = float(config[WIDTH_RATE])
        model = build_model(sliced_spec(spec, rate))
        if bool(config.get(WIDTH_SCALER, False)):
            attach_width_scaler(model, rate)
        return model

    def local_training(self, model: torch.nn.Module, spec: ModelSpec, config: Mapping[str, Any],
                       seed: int, labels: torch.Tensor, memory: NodeMemory | None = None) -> LocalTraining:
        return label_split(spec, config, labels)


class OrderedDropoutWidths(WidthSlice):
    """FjORD: the node's largest nested sub-model, and before every local step a width drawn from
    the message's ``fjord-rates`` (ordered dropout, :mod:`resist_fl.node.ordered_dropout`); with
    ``fjord-distill`` the step's loss is self-distillation's."""

    def local_training(self, model: torch.nn.Module, spec: ModelSpec, config: Mapping[str, Any],
                       seed: int, labels: torch.Tensor, memory: NodeMemory | None = None) -> LocalTraining:
        od = OrderedDropout(model, spec, float(config[WIDTH_RATE]), list(config[FJORD_RATES]), seed=seed)
        return LocalTraining(od.sample, od.distillation_loss if bool(config.get(FJORD_DISTILL, False)) else None)


class DepthExits(SubNetwork):
    """DepthFL: the first ``depth-exits`` stages with their exits
    (:class:`~resist_fl.core.early_exits.MultiExitResNet`), trained on cross-entropy at every exit plus
    mutual self-distillation weighted by the message's ``distill-weight``; with the message's
    ``feddyn-alpha`` (> 0) plus FedDyn's dynamic regulariser, whose state the node keeps in ``memory``
    (:mod:`resist_fl.node.feddyn_regularizer`)."""

    def build(self, spec: ModelSpec, layout: BlockLayout, config: Mapping[str, Any]) -> torch.nn.Module:
        return build_model(replace(spec, exits=int(config[DEPTH_EXITS])))

    def local_training(self, model: torch.nn.Module, spec: ModelSpec, config: Mapping[str, Any],
                       seed: int, labels: torch.Tensor, memory: NodeMemory | None = None) -> LocalTraining:
        loss, exits = mutual_distillation(float(config[DISTILL_WEIGHT])), int(config[DEPTH_EXITS])
        alpha = float(config.get(FEDDYN_ALPHA, 0.0))
        if alpha <= 0:
            return LocalTraining(loss=loss, loss_terms=exits)
        if memory is None:
            raise ValueError(f"{FEDDYN_ALPHA} = {alpha}: FedDyn needs the node's memory across rounds")
        regularizer = FedDynRegularizer(model, alpha, memory.load(STATE_KEY))
        return LocalTraining(loss=regularizer.loss(loss), loss_terms=exits,
                             after_training=lambda: memory.save(STATE_KEY, regularizer.updated_state()))
