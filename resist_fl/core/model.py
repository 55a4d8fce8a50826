"""The pre-activation ResNet family used by ResIST.

This is the CIFAR-style PreActResNet of the official ResIST code: a 3x3 stem
without normalisation, four stages of basic pre-activation blocks with
64/128/256/512 channels (times a width factor), average pooling and a linear
head. Every block multiplies its residual branch by a ``residual_scale``
buffer before adding the shortcut; the buffer is part of the ``state_dict`` so
that a saved global model evaluates correctly with nothing but this module.

A *sub-network* is the same class built with some blocks dropped: a dropped
block is a parameter-free :class:`torch.nn.Identity`, so the remaining keys
keep the global model's names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("batchnorm", "batchnorm-running", "groupnorm")
"""Normalisation layers: the paper's BatchNorm without running statistics
(batch statistics also at test time), BatchNorm with running statistics, and
GroupNorm (no batch statistics at all)."""

PRESET_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "preact_resnet18": (2, 2, 2, 2),
    "preact_resnet34": (3, 4, 6, 3),
    "preact_resnet101": (3, 4, 23, 3),
    "preact_resnet152": (3, 4, 36, 3),
    "preact_resnet200": (3, 4, 50, 3),
}
"""Stage depths of the named presets (basic blocks, as in the paper)."""

TORCHVISION_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "torchvision_resnet18": (2, 2, 2, 2),
    "torchvision_resnet34": (3, 4, 6, 3),
    "torchvision_resnet50": (3, 4, 6, 3),
    "torchvision_resnet101": (3, 4, 23, 3),
    "torchvision_resnet152": (3, 8, 36, 3),
}
"""torchvision's post-activation ResNets (bottleneck blocks from 50 up), width fixed at 64."""
ARCHS = ("preact", *TORCHVISION_DEPTHS)
STEMS = ("cifar", "imagenet")
"""``cifar``: a 3x3 stride-1 convolution (32x32 inputs); ``imagenet``: a 7x7 stride-2 convolution,
normalisation + ReLU, and a 3x3 stride-2 max-pool (224x224 inputs; torchvision's stem, also
for the pre-activation family, as in He et al.'s pre-activation ResNets for ImageNet)."""

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
RESIDUAL_SCALE = "residual_scale"
"""Name of the per-block buffer that scales the residual branch."""


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build the normalisation layer ``norm`` for ``channels`` channels."""
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "batchnorm-running":
        return nn.BatchNorm2d(channels)
    if norm == "groupnorm":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


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


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model (saved with every checkpoint).

    Parameters
    ----------
    depths : tuple of int
        Number of blocks in each of the four stages.
    num_classes : int
        Classifier outputs.
    in_channels : int
        Input image channels.
    base_width : int
        Channels of the stem and the first stage (64 in the paper); the
        stages use 1x, 2x, 4x, 8x this width.
    norm : str
        One of :data:`NORMS`.
    arch : str
        ``preact`` (this module's family) or a torchvision ResNet (:data:`TORCHVISION_DEPTHS`),
        whose depths and width (64) are torchvision's.
    stem : str
        One of :data:`STEMS`.
    """

    depths: tuple[int, ...] = PRESET_DEPTHS["preact_resnet18"]
    num_classes: int = 10
    in_channels: int = 3
    base_width: int = 64
    norm: str = "batchnorm"
    arch: str = "preact"
    stem: str = "cifar"

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be four positive stage depths, got {self.depths}")
        for name in ("num_classes", "in_channels", "base_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {', '.join(NORMS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {', '.join(STEMS)}")
        if self.arch in TORCHVISION_DEPTHS and (self.depths, self.base_width) != (TORCHVISION_DEPTHS[self.arch], 64):
            raise ValueError(f"{self.arch} has depths {TORCHVISION_DEPTHS[self.arch]} and width 64, "
                             f"got {self.depths} and {self.base_width}")

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> "ModelSpec":
        """Spec of the preset ``name`` (see :data:`PRESET_DEPTHS`)."""
        if name not in PRESET_DEPTHS:
            raise ValueError(f"unknown model {name!r}; expected one of {', '.join(PRESET_DEPTHS)}")
        return cls(depths=PRESET_DEPTHS[name], **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON- and torch.save-friendly)."""
        d = asdict(self)
        d["depths"] = list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        return cls(**d)


def _make_stage(in_planes: int, planes: int, depth: int, stride: int, norm: str,
                prefix: str, dropped: set[str]) -> nn.Sequential:
    """One stage; blocks named in ``dropped`` become identities."""
    blocks: list[nn.Module] = []
    for i in range(depth):
        block = PreActBlock(in_planes, planes, stride if i == 0 else 1, norm)
        name = f"{prefix}.{i}"
        if name in dropped:
            if block.changes_shape:
                raise ValueError(f"block {name} changes the tensor shape and cannot be dropped")
            block = nn.Identity()
        blocks.append(block)
        in_planes = planes
    return nn.Sequential(*blocks)


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet (the model of the ResIST paper).

    Parameters
    ----------
    spec : ModelSpec
        Depths, classes, width and norm.
    dropped_blocks : iterable of str
        Block names (``"layer3.4"``) built as parameter-free identities; the
        result is a sub-network whose state_dict keys are a subset of the
        full model's, with the same names.
    """

    def __init__(self, spec: ModelSpec, dropped_blocks: Iterable[str] = ()) -> None:
        super().__init__()
        self.spec = spec
        dropped = set(dropped_blocks)
        known = {f"layer{s + 1}.{i}" for s, d in enumerate(spec.depths) for i in range(d)}
        if unknown := sorted(dropped - known):
            raise ValueError(f"unknown blocks {unknown}; the model has {len(known)} blocks "
                             "named like 'layer3.1'")
        width = [spec.base_width * c // 64 for c in STAGE_CHANNELS]
        if spec.stem == "imagenet":  # 224x224 -> 56x56 before the first stage
            self.conv1 = nn.Conv2d(spec.in_channels, width[0], 7, stride=2, padding=3, bias=False)
            self.stem = nn.Sequential(make_norm(spec.norm, width[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, width[0], 3, stride=1, padding=1, bias=False)
            self.stem = nn.Identity()
        in_planes = width[0]
        for s in range(4):
            stage = _make_stage(in_planes, width[s], spec.depths[s], STAGE_STRIDES[s],
                                spec.norm, f"layer{s + 1}", dropped)
            self.add_module(f"layer{s + 1}", stage)
            in_planes = width[s]
        self.linear = nn.Linear(width[3], spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(self.conv1(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def blocks(self) -> dict[str, PreActBlock]:
        """Present (not dropped) blocks by name, in forward order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, PreActBlock)}


def build_model(spec: ModelSpec, dropped_blocks: Iterable[str] = ()) -> nn.Module:
    """Build the full model, or a sub-network without ``dropped_blocks`` (a
    :class:`PreActResNet`, or a torchvision ResNet with residual scales)."""
    if spec.arch in TORCHVISION_DEPTHS:
        from resist_fl.core.torchvision_resnets import build_torchvision_resnet

        return build_torchvision_resnet(spec, dropped_blocks)
    return PreActResNet(spec, dropped_blocks)


def _preset(name: str):
    def factory(num_classes: int = 10, in_channels: int = 3, base_width: int = 64,
                norm: str = "batchnorm") -> PreActResNet:
        return PreActResNet(ModelSpec.from_name(name, num_classes=num_classes,
                                                in_channels=in_channels,
                                                base_width=base_width, norm=norm))
    factory.__name__ = name
    factory.__doc__ = f"{name}: stage depths {PRESET_DEPTHS[name]} of basic pre-activation blocks."
    return factory


preact_resnet18 = _preset("preact_resnet18")
preact_resnet34 = _preset("preact_resnet34")
preact_resnet101 = _preset("preact_resnet101")
preact_resnet152 = _preset("preact_resnet152")
preact_resnet200 = _preset("preact_resnet200")


def set_residual_scales(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Set the residual scale of the named blocks (e.g. the inference scales) of a
    :class:`PreActResNet` or any model whose blocks own a ``residual_scale`` buffer."""
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
