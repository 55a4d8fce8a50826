"""The pre-activation ResNet family used by ResIST.

This is the CIFAR-style PreActResNet of the official ResIST code: a 3x3 stem
without normalisation, four stages of basic pre-activation blocks with
64/128/256/512 channels (times a width factor), average pooling and a linear
head. Every block multiplies its residual branch by a ``residual_scale``
buffer before adding the shortcut; the buffer is part of the ``state_dict`` so
that a saved global model evaluates correctly with nothing but this module.

A model family of the core: above the residual-scale primitives and the norms, below
:mod:`resist_fl.core.model` (which names the presets and builds any family from a spec).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from resist_fl.core.norms import make_norm
from resist_fl.core.residual_nets import RESIDUAL_SCALE

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


class ResNetShape(Protocol):
    """What a model family is built from (a :class:`~resist_fl.core.model.ModelSpec` has it)."""

    depths: tuple[int, ...]
    num_classes: int
    in_channels: int
    base_width: int
    norm: str
    stem: str
    head_norm: bool
    exits: int
    stage_widths: tuple[int, ...]


class PreActBlock(nn.Module):
    """Basic pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3.

    When the shape changes, the shortcut is a 1x1 convolution (no bias, no
    norm) applied to the *pre-activated* input. The output is
    ``residual_scale * branch + shortcut``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.bn1 = make_norm(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.register_buffer(RESIDUAL_SCALE, torch.tensor(1.0))

    @property
    def changes_shape(self) -> bool:
        """Whether the block cannot be replaced by an identity."""
        return self.shortcut is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out * self.residual_scale + shortcut


def make_stage(in_planes: int, planes: int, depth: int, stride: int, norm: str) -> nn.Sequential:
    """One stage of ``depth`` blocks; the first one strides (and projects when the shape changes)."""
    return nn.Sequential(*(PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, norm)
                           for i in range(depth)))


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet (the model of the ResIST paper).

    Parameters
    ----------
    spec : ResNetShape
        Depths, classes, input channels, width, norm and stem (a
        :class:`~resist_fl.core.model.ModelSpec`, or anything with those fields).

    A sub-network is made from it like from any residual network, by skipping blocks
    (:func:`~resist_fl.core.residual_nets.skip_blocks`): the remaining keys keep their names.
    """

    def __init__(self, spec: ResNetShape) -> None:
        super().__init__()
        self.spec = spec
        self.widths = widths_of(spec)
        add_trunk(self, spec, 4)
        self.head_norm = make_norm(spec.norm, self.widths[3]) if spec.head_norm else None
        self.linear = nn.Linear(self.widths[3], spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.conv1(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(pooled(out, self.head_norm))


def add_trunk(model: nn.Module, spec: ResNetShape, stages: int) -> None:
    """Give ``model`` the stem and the first ``stages`` stages (``conv1``, ``stem``, ``layer1`` ...)."""
    width = widths_of(spec)
    if spec.stem == "imagenet":  # 224x224 -> 56x56 before the first stage
        model.conv1 = nn.Conv2d(spec.in_channels, width[0], 7, stride=2, padding=3, bias=False)
        model.stem = nn.Sequential(make_norm(spec.norm, width[0]), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(3, stride=2, padding=1))
    else:
        model.conv1 = nn.Conv2d(spec.in_channels, width[0], 3, stride=1, padding=1, bias=False)
        model.stem = nn.Identity()
    in_planes = width[0]
    for s in range(stages):
        model.add_module(f"layer{s + 1}", make_stage(in_planes, width[s], spec.depths[s], STAGE_STRIDES[s], spec.norm))
        in_planes = width[s]


def stage_widths(base_width: int) -> tuple[int, ...]:
    """Channels of the four stages for a first-stage width ``base_width``."""
    return tuple(base_width * c // 64 for c in STAGE_CHANNELS)


def widths_of(spec: ResNetShape) -> tuple[int, ...]:
    """Channels of ``spec``'s four stages: its own ``stage_widths`` when it names them (a width-sliced
    sub-model of HeteroFL's per-layer rule), else those of its ``base_width``."""
    return tuple(spec.stage_widths) or stage_widths(spec.base_width)


def pooled(out: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """The classifier's input: ``norm`` and a ReLU when given (``head_norm``), then global average pooling."""
    if norm is not None:
        out = F.relu(norm(out))
    return F.adaptive_avg_pool2d(out, 1).flatten(1)
