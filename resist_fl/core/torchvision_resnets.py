"""torchvision's post-activation ResNets (``resnet18/34/50/101/152``) as ResIST models.

Built by torchvision (imported only here, when asked for), optionally with the CIFAR-style
stem for 32x32 inputs (a 3x3 stride-1 convolution and no max-pool, as in the paper's model),
then given residual scales on ``layer3`` by :meth:`BlockLayout.from_model`. Blocks from
ResNet-50 up are bottlenecks. The paper found pre-activation blocks decompose better; these
exist to measure that, and as the documented example of bringing one's own residual network.
"""

from __future__ import annotations

import torch
from torch import nn

from resist_fl.core.decomposition import BlockLayout

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def torchvision_resnet(name: str, num_classes: int = 10, in_channels: int = 3, cifar_stem: bool = True,
                       image_size: int = 32, stages: tuple[str, ...] = ("layer3",)) -> tuple[nn.Module, BlockLayout]:
    """The torchvision ResNet ``name`` (randomly initialised) and its block layout."""
    if name not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown torchvision ResNet {name!r}; expected one of {', '.join(TORCHVISION_RESNETS)}")
    from torchvision import models

    model = getattr(models, name)(num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    layout = BlockLayout.from_model(model, torch.zeros(2, in_channels, image_size, image_size), stages)
    return model, layout
