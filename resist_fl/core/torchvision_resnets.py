"""torchvision's post-activation ResNets (``resnet18/34/50/101/152``) as ResIST models.

Built by torchvision (imported only here, when asked for) with this project's normalisation
layers (``norm``), optionally with the CIFAR-style stem for 32x32 inputs (a 3x3 stride-1
convolution and no max-pool, as in the paper's model). Every block of the four stages gets a
``residual_scale`` buffer applied by a hook (:mod:`resist_fl.core.residual_nets`), so the
``state_dict`` keys do not depend on which stages are partitioned; a sub-network skips its
dropped blocks, as every family's does. Blocks from ResNet-50 up are bottlenecks. The paper found pre-activation blocks
decompose better; these exist to measure that, and as the documented example of bringing one's
own residual network.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from resist_fl.core.norms import make_norm
from resist_fl.core.preact_resnet import ResNetShape
from resist_fl.core.residual_nets import attach_residual_scales

STAGES = ("layer1", "layer2", "layer3", "layer4")
TORCHVISION_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "torchvision_resnet18": (2, 2, 2, 2),
    "torchvision_resnet34": (3, 4, 6, 3),
    "torchvision_resnet50": (3, 4, 6, 3),
    "torchvision_resnet101": (3, 4, 23, 3),
    "torchvision_resnet152": (3, 8, 36, 3),
}
"""torchvision's post-activation ResNets (bottleneck blocks from 50 up), width fixed at 64."""


def build_torchvision_resnet(spec: ResNetShape) -> nn.Module:
    """The torchvision ResNet of ``spec`` (its ``arch``, e.g. ``torchvision_resnet50``), randomly
    initialised, every block of the four stages with a residual scale."""
    from torchvision import models

    name = spec.arch.removeprefix("torchvision_")
    model = getattr(models, name)(num_classes=spec.num_classes, norm_layer=partial(make_norm, spec.norm))
    if spec.stem == "cifar":
        model.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif spec.in_channels != 3:
        model.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return attach_residual_scales(model, STAGES)
