"""The methods a run can train with: one table, read by the settings, the ServerApp and the reports.

Each :class:`Method` names its strategy's factory (``module:function``, imported only by the
ServerApp, so the settings never import Flower), its label in reports, and what it supports. The
settings' validation, the ServerApp, the reports' labels and the run-config reference read this
table; no other module dispatches on a method's name.

Adding a method is one strategy module with a ``from_settings(settings, model)`` factory, its entry
here, a node-side hook if it trains differently (the strategy says so in the messages it sends),
and its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One trainable method.

    Attributes
    ----------
    name : str
        The ``strategy`` run-config value.
    label : str
        How reports and figures name it.
    factory : str
        ``module:attribute`` building its strategy (a function or a class's ``from_settings``):
        ``attribute(settings, model) -> Built``
        (:mod:`server_app.app`).
    dp : tuple of str
        The ``dp`` modes it runs under: every method runs under ``central`` (the server-side
        wrapper, :class:`~resist_fl.flower.central_dp_strategy.CentrallyPrivate`); ``local``
        (DP-SGD on the node) where its node-side training is plain SGD on the model it receives.
    federated_evaluation : bool
        Evaluates on the nodes (``fraction-evaluate`` > 0): its nodes hold the global model.
    preact_only : bool
        Builds on the pre-activation family (slices its channels, or adds exits to it): needs
        ``model = 'preact_resnet*'``.
    node_hook : str
        ``module:class`` of what its nodes do differently (:mod:`resist_fl.node.method_hooks`: the
        model a node builds for a message, what runs before each local step).
    reads : tuple of str
        Run-config keys that only some methods read and this one does: set to a non-default value
        for a method that does not read it, a key is an error, never silently dropped.
    summary : str
        What it is, in a phrase (the run-config reference's ``strategy`` entry is built from these).
    """

    name: str
    label: str
    factory: str
    dp: tuple[str, ...] = ("central", "local")
    federated_evaluation: bool = False
    preact_only: bool = False
    node_hook: str = "resist_fl.node.method_hooks:SubNetwork"
    reads: tuple[str, ...] = ()
    summary: str = ""


SERVER_STEP = ("server-lr",)
RESIST_ONLY = ("allocation", "min-blocks-per-site", "inference-scaling", "privacy-min-holders", "privacy-strict")
"""ResIST's random decomposition: how depths are allocated, its minimum depth, its inference scale, and
how many nodes each block is dealt to (the only method that deals a block to several nodes)."""
WARMUP = ("warmup-rounds",)
"""Full-model FedAvg rounds before the decomposition (ResIST and the depth prefix, which share its round)."""
WIDTH_SLICE = "resist_fl.node.method_hooks:WidthSlice"
CENTRAL_ONLY = ("central",)
ORDERED_DROPOUT = "resist_fl.node.method_hooks:OrderedDropoutWidths"
FJORD_LEVELS = ("fjord-levels",)
LABEL_SPLIT = ("label-split",)
WIDTHS = ("width-rates",)
"""The widths a node may get (HeteroFL, FedRolex, fedavg-small; FjORD has its own levels)."""

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("resist", "ResIST", "resist_fl.flower.resist:from_settings", reads=(*SERVER_STEP, *RESIST_ONLY, *WARMUP),
           summary="the random layer-wise decomposition into shallow sub-ResNets, one per node"),
    Method("fedavg", "FedAvg", "resist_fl.flower.fedavg:from_settings", federated_evaluation=True,
           reads=SERVER_STEP, summary="FedAvg: the mean of the sampled nodes' whole models, over the same screening "
                                      "as every method; the paper's local-SGD baseline when all clients train"),
    Method("heterofl", "HeteroFL", "resist_fl.flower.width_sliced:HeteroFL.from_settings", preact_only=True,
           node_hook=WIDTH_SLICE, reads=(*LABEL_SPLIT, *WIDTHS),
           summary="width-sliced: static width tiers, the first r x C channels, scaler"),
    Method("fedrolex", "FedRolex", "resist_fl.flower.width_sliced:FedRolex.from_settings", preact_only=True,
           node_hook=WIDTH_SLICE, reads=(*LABEL_SPLIT, *WIDTHS, "fedrolex-overlap"),
           summary="width-sliced: a rolling window of r x C channels"),
    Method("fjord", "FjORD", "resist_fl.flower.width_sliced:FjORD.from_settings", preact_only=True,
           node_hook=ORDERED_DROPOUT, reads=FJORD_LEVELS,
           dp=CENTRAL_ONLY,  # ordered dropout per batch is not what Opacus' DP-SGD trains
           summary="width-sliced, ordered dropout: per batch a nested width at or below the node's"),
    Method("fjord-kd", "FjORD (KD)", "resist_fl.flower.width_sliced:FjORDDistilled.from_settings",
           preact_only=True, node_hook=ORDERED_DROPOUT, reads=FJORD_LEVELS, dp=CENTRAL_ONLY,
           summary="`fjord` with its self-distillation"),
    Method("depth-prefix", "depth prefix", "resist_fl.flower.resist:depth_prefix_from_settings",
           reads=(*SERVER_STEP, *WARMUP),
           summary="depth: a node always trains the first partitionable blocks its budget allows, the static "
                   "counterpart of ResIST's random decomposition; formerly `depth-tiers`"),
    Method("depthfl", "DepthFL", "resist_fl.flower.depthfl:from_settings", preact_only=True,
           node_hook="resist_fl.node.method_hooks:DepthExits", reads=(*SERVER_STEP, "depthfl-distill", "feddyn-alpha"),
           dp=CENTRAL_ONLY,  # its loss is several exits' and their distillation, not one model's cross-entropy
           summary="depth: the first stages that fit, an exit after each, mutual self-distillation, the ensemble "
                   "of exits at test"),
    Method("fedavg-small", "FedAvg-small", "resist_fl.flower.fedavg:small_from_settings", federated_evaluation=True,
           preact_only=True, node_hook=WIDTH_SLICE, reads=(*SERVER_STEP, *WIDTHS),
           summary="FedAvg of the one width that fits the weakest capacity the nodes connected at the start "
                   "declare, or a dynamic `capacity-profile` may draw"),
)}

FORMER_NAMES = {"depth-tiers": "depth-prefix"}
"""Names a method had in runs committed before a rename: their records are read (and labelled) under
the method's current name; a new run config naming one is refused with the new name."""

STRATEGIES = tuple(METHODS)
"""The ``strategy`` values, in the order the docs list them."""
LOCAL_DP = tuple(name for name, m in METHODS.items() if "local" in m.dp)
"""The methods that run under ``dp='local'`` (the settings' reference says so from this table)."""
LABELS = {name: m.label for name, m in METHODS.items()}
"""How reports and figures name each method."""


def method(name: str) -> Method:
    """The method called ``name`` (or formerly called so, :data:`FORMER_NAMES`); ValueError naming the
    choices otherwise."""
    name = FORMER_NAMES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"strategy = {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def load(path: str):
    """The object ``module:attribute`` names (a factory, a class's ``from_settings``, a node hook)."""
    module, attributes = path.split(":")
    found = importlib.import_module(module)
    for name in attributes.split("."):
        found = getattr(found, name)
    return found


def label(name: str) -> str:
    """How reports name the method ``name`` (the name itself for one not in the table)."""
    return LABELS.get(FORMER_NAMES.get(name, name), name)


def readers(key: str) -> tuple[str, ...]:
    """The methods that read ``key`` when only some do (empty: every method reads it)."""
    return tuple(m.name for m in METHODS.values() if key in m.reads)


def keys_read_by_some() -> tuple[str, ...]:
    """Every run-config key that only some methods read."""
    return tuple(sorted({key for m in METHODS.values() for key in m.reads}))
