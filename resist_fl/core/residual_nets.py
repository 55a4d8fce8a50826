"""Any residual network as a ResIST model: stages of residual blocks, a residual-branch scale and
skippable blocks, without editing the user's block class.

A *stage* is an ``nn.Sequential`` of residual blocks in which every block after the first keeps
its input's shape (so it can be replaced by an identity): torchvision's ``layer1`` ... ``layer4``,
or any module path the user names (``"backbone.layer3"``). :func:`find_stages` finds such
sequences in the module tree when no names are given.

- :func:`attach_residual_scales` gives each block a ``residual_scale`` buffer (part of the
  ``state_dict``, 1.0 by default) and a forward hook on the last normalisation layer of its
  residual branch (the last BatchNorm/GroupNorm/LayerNorm module outside its shortcut, e.g.
  ``bn2`` of torchvision's ``BasicBlock``, ``bn3`` of its ``Bottleneck``) that multiplies that
  layer's output by the scale, i.e. ``out = act(scale * branch + shortcut)``.
- :func:`skip_blocks` replaces blocks by ``nn.Identity`` in place: the other blocks keep their
  indices, so every remaining ``state_dict`` key keeps the global model's name. For a
  post-activation block whose input is itself a ReLU output, skipping equals a residual scale
  of 0 (``relu(0 + x) = x``).

The bottom layer of the core (with :mod:`resist_fl.core.norms`): the model families above it
own their blocks, and every sub-network is made here, by skipping blocks. Pure PyTorch;
nothing imports Flower.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

RESIDUAL_SCALE = "residual_scale"
"""Name of the per-block buffer that scales the residual branch (every model family's)."""
NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
SHORTCUT_NAMES = ("downsample", "shortcut")
"""Child names of a block's shortcut path (torchvision: ``downsample``)."""


def find_stages(model: nn.Module) -> list[str]:
    """Module paths of the ``nn.Sequential`` modules whose children are all of one class with a
    normalisation layer inside (torchvision ResNets: ``layer1`` ... ``layer4``), outermost first."""
    stages = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Sequential) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and any(isinstance(m, NORM_TYPES) for m in module[0].modules()):
            if not any(name.startswith(f"{outer}.") for outer in stages):
                stages.append(name)
    if not stages:
        raise ValueError(f"no stage found in {type(model).__name__}: expected nn.Sequential modules of residual "
                         "blocks (e.g. torchvision's layer1 ... layer4); name them explicitly")
    return stages


def stage_module(model: nn.Module, stage: str) -> nn.Sequential:
    """The ``nn.Sequential`` at module path ``stage``, or ValueError naming what is there."""
    try:
        module = model.get_submodule(stage)
    except AttributeError as err:
        raise ValueError(f"stage {stage!r}: {type(model).__name__} has no such module") from err
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"stage {stage!r} is a {type(module).__name__}; expected an nn.Sequential of blocks")
    return module


def branch_norm(block: nn.Module) -> nn.Module:
    """The last normalisation layer of ``block``'s residual branch (outside its shortcut)."""
    norms = [m for name, m in block.named_modules()
             if isinstance(m, NORM_TYPES) and name.split(".")[0] not in SHORTCUT_NAMES]
    if not norms:
        raise ValueError(f"{type(block).__name__} has no normalisation layer on its residual branch to scale; "
                         f"expected a {' / '.join(t.__name__ for t in NORM_TYPES)} outside "
                         f"{' / '.join(SHORTCUT_NAMES)}")
    return norms[-1]


class _ScaleBranch:
    """Forward hook of a branch's last norm: multiply its output by the block's residual scale.

    A callable object rather than a closure, so ``copy.deepcopy`` of the model points the copy's
    hook at the copy's block."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, _module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return output * getattr(self.block, RESIDUAL_SCALE)


def attach_residual_scales(model: nn.Module, stages: Sequence[str]) -> nn.Module:
    """Give every block of ``stages`` a ``residual_scale`` buffer and the hook that applies it
    (idempotent; blocks that already own the buffer, like :class:`PreActBlock`, are left alone)."""
    for stage in stages:
        for block in stage_module(model, stage):
            if hasattr(block, RESIDUAL_SCALE):
                continue
            block.register_buffer(RESIDUAL_SCALE, torch.tensor(1.0))
            branch_norm(block).register_forward_hook(_ScaleBranch(block))
    return model


def skip_blocks(model: nn.Module, blocks: Iterable[str]) -> nn.Module:
    """Replace each block (``"layer3.2"``: stage path, then index) by ``nn.Identity``, in place."""
    for block in blocks:
        stage, _, index = block.rpartition(".")
        module = stage_module(model, stage)
        if not index.isdigit() or not 0 < int(index) < len(module):
            raise ValueError(f"block {block!r}: expected {stage}.<1..{len(module) - 1}> (the first block of a "
                             "stage changes the shape and cannot be skipped)")
        module[int(index)] = nn.Identity()
    return model


def partitionable_blocks(model: nn.Module, stages: Sequence[str], example: torch.Tensor) -> tuple[str, ...]:
    """The blocks after the first of each stage, checked to keep their input's shape on ``example``."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = []
    for stage in stages:
        for index, block in enumerate(stage_module(model, stage)):
            name = f"{stage}.{index}"
            hooks.append(block.register_forward_hook(
                lambda _m, inputs, output, name=name: shapes.__setitem__(name, (inputs[0].shape, output.shape))))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    blocks = []
    for stage in stages:
        for index in range(1, len(stage_module(model, stage))):
            name = f"{stage}.{index}"
            before, after = shapes[name]
            if before != after:
                raise ValueError(f"block {name} changes the shape {tuple(before)} -> {tuple(after)}: only blocks "
                                 "that keep their input's shape can be dropped from a sub-network")
            blocks.append(name)
    if not blocks:
        raise ValueError(f"stages {list(stages)} have no block after their first: nothing to partition")
    return tuple(blocks)


def subnetwork_of(model: nn.Module, dropped: Iterable[str]) -> nn.Module:
    """A copy of ``model`` with the ``dropped`` blocks skipped (its keys: the global names minus theirs)."""
    return skip_blocks(copy.deepcopy(model), dropped)


def set_residual_scales(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Set the residual scale of the named blocks (e.g. the inference scales) of a
    :class:`~resist_fl.core.preact_resnet.PreActResNet` or any model whose blocks own a ``residual_scale`` buffer."""
    blocks = {}
    for name in scales:
        try:
            blocks[name] = model.get_submodule(name)
        except AttributeError:
            continue
    if missing := sorted(n for n in scales if not hasattr(blocks.get(n), RESIDUAL_SCALE)):
        raise ValueError(f"blocks {missing} are not present in this model")
    with torch.no_grad():
        for name, scale in scales.items():
            getattr(blocks[name], RESIDUAL_SCALE).fill_(float(scale))
