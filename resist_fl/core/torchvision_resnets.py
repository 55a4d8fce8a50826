"""torchvision's post-activation ResNets (``resnet18/34/50/101/152``) as ResIST models.

Built by torchvision (imported only here, when asked for) with this project's normalisation
layers (``norm``), optionally with the CIFAR-style stem for 32x32 inputs (a 3x3 stride-1
convolution and no max-pool, as in the paper's model). Every block of the four stages gets a
``residual_scale`` buffer applied by a hook (:mod:`resist_fl.core.residual_nets`), so the
``state_dict`` keys do not depend on which stages are partitioned; a sub-network skips its
dropped blocks. Blocks from ResNet-50 up are bottlenecks. The paper found pre-activation blocks
decompose better; these exist to measure that, and as the documented example of bringing one's
own residual network.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import TORCHVISION_DEPTHS, ModelSpec, make_norm
from resist_fl.core.residual_nets import attach_residual_scales, skip_blocks

STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_torchvision_resnet(spec: ModelSpec, dropped_blocks: Iterable[str] = ()) -> nn.Module:
    """The torchvision ResNet of ``spec`` (randomly initialised), without ``dropped_blocks``."""
    from torchvision import models

    name = spec.arch.removeprefix("torchvision_")
    model = getattr(models, name)(num_classes=spec.num_classes, norm_layer=partial(make_norm, spec.norm))
    if spec.stem == "cifar":
        model.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif spec.in_channels != 3:
        model.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    attach_residual_scales(model, STAGES)
    return skip_blocks(model, dropped_blocks)


def torchvision_resnet(name: str, num_classes: int = 10, in_channels: int = 3, stem: str = "cifar",
                       image_size: int = 32, stages: tuple[str, ...] = ("layer3",)) -> tuple[nn.Module, BlockLayout]:
    """The torchvision ResNet ``name`` (``"resnet50"``) and its layout with ``stages`` partitioned."""
    arch = f"torchvision_{name}"
    if arch not in TORCHVISION_DEPTHS:
        raise ValueError(f"unknown torchvision ResNet {name!r}; expected one of "
                         f"{', '.join(a.removeprefix('torchvision_') for a in TORCHVISION_DEPTHS)}")
    spec = ModelSpec(depths=TORCHVISION_DEPTHS[arch], num_classes=num_classes, in_channels=in_channels,
                     base_width=64, norm="batchnorm-running", arch=arch, stem=stem)
    model = build_torchvision_resnet(spec)
    return model, BlockLayout.from_model(model, torch.zeros(2, in_channels, image_size, image_size), stages)
