"""What a model is: :class:`ModelSpec` (saved with every checkpoint) and :func:`build_model`.

Above the model families (:mod:`resist_fl.core.preact_resnet`, the paper's pre-activation
ResNets; :mod:`resist_fl.core.torchvision_resnets`) and below the decomposition: a spec names the
family, its depths, width, norm and stem, and :func:`build_model` builds the full model. A
sub-network is always that model with blocks skipped
(:meth:`resist_fl.core.decomposition.BlockLayout.build_subnetwork`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from resist_fl.core.early_exits import MultiExitResNet
from resist_fl.core.norms import NORMS
from resist_fl.core.preact_resnet import PreActResNet
from resist_fl.core.torchvision_resnets import TORCHVISION_DEPTHS, build_torchvision_resnet

PRESET_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "preact_resnet18": (2, 2, 2, 2),
    "preact_resnet34": (3, 4, 6, 3),
    "preact_resnet101": (3, 4, 23, 3),
    "preact_resnet152": (3, 4, 36, 3),
    "preact_resnet200": (3, 4, 50, 3),
}
"""Stage depths of the named presets (basic blocks, as in the paper)."""

ARCHS = ("preact", *TORCHVISION_DEPTHS)
STEMS = ("cifar", "imagenet")
"""``cifar``: a 3x3 stride-1 convolution (32x32 inputs); ``imagenet``: a 7x7 stride-2 convolution,
normalisation + ReLU, and a 3x3 stride-2 max-pool (224x224 inputs; torchvision's stem, also
for the pre-activation family, as in He et al.'s pre-activation ResNets for ImageNet)."""


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
    head_norm : bool
        A norm and a ReLU between the last stage and the pooling (the pre-activation ResNet of
        HeteroFL's code, ``n4``; the ResIST paper's model has none): the ``preact`` family only.
    exits : int
        0: one classifier after the last stage. 1-4: DepthFL's multi-exit model cut after that many
        stages, one classifier (exit) after each (:mod:`resist_fl.core.early_exits`); the ``preact``
        family only.
    stage_widths : tuple of int
        ``()``: the stages have 1x, 2x, 4x, 8x ``base_width`` channels. Else the four stages' own channel
        counts (a width-sliced sub-model by HeteroFL's per-layer rule, ``ceil(r x C)`` in every layer,
        :func:`~resist_fl.core.width_slicing.sliced_spec`; ``base_width`` is then the first stage's);
        the ``preact`` family only.
    """

    depths: tuple[int, ...] = PRESET_DEPTHS["preact_resnet18"]
    num_classes: int = 10
    in_channels: int = 3
    base_width: int = 64
    norm: str = "batchnorm"
    arch: str = "preact"
    stem: str = "cifar"
    head_norm: bool = False
    exits: int = 0
    stage_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "stage_widths", tuple(int(w) for w in self.stage_widths))
        if self.stage_widths and (len(self.stage_widths) != 4 or min(self.stage_widths) < 1
                                  or self.stage_widths[0] != int(self.base_width) or self.arch != "preact"):
            raise ValueError(f"stage_widths must be () or four positive channel counts of the preact family, the "
                             f"first equal to base_width ({self.base_width}), got {self.stage_widths} ({self.arch})")
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
        if not 0 <= int(self.exits) <= 4:
            raise ValueError(f"exits must be 0 (one classifier) or 1-4 (DepthFL's exits), got {self.exits}")
        if (self.head_norm or self.exits) and self.arch != "preact":
            raise ValueError(f"head_norm and exits are defined for the pre-activation family, not {self.arch!r}")
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
        if self.stage_widths:  # (absent otherwise: the form every earlier run recorded)
            d["stage_widths"] = list(self.stage_widths)
        else:
            del d["stage_widths"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        return cls(**d)


def build_model(spec: ModelSpec) -> nn.Module:
    """The full model of ``spec``: a :class:`~resist_fl.core.preact_resnet.PreActResNet` (with
    ``exits``: DepthFL's :class:`~resist_fl.core.early_exits.MultiExitResNet`), or a torchvision
    ResNet with residual scales."""
    if spec.arch in TORCHVISION_DEPTHS:
        return build_torchvision_resnet(spec)
    return MultiExitResNet(spec) if spec.exits else PreActResNet(spec)
