"""DepthFL's multi-exit ResNet: a classifier after every stage, and the mean of the exits at test.

DepthFL (Kim et al., ICLR 2023) gives a node of depth d the first d stages of the network and the d
classifiers after them; every classifier is trained (cross-entropy on each exit, plus mutual
self-distillation between them: :mod:`resist_fl.node.mutual_distillation`), and the global model
predicts with the mean of all its exits' logits. This module builds that model on the project's
pre-activation trunk (:mod:`resist_fl.core.preact_resnet`), following the authors' code in Flower's
baselines (``baselines/depthfl/depthfl/resnet.py`` of adap/flower at fdef7af):

- an exit after stage s < 4 is ``attention`` (a :class:`SepConv` of stride 2, a norm, ReLU, upsampling
  back to the stage's size, a sigmoid: a gate multiplied with the stage's output, lines 182-192 and
  304-305), then ``scala`` (one stride-2 :class:`SepConv` per later stage, each doubling the channels
  up to the last stage's, then global average pooling, lines 163-180) and ``fc`` (a linear
  classifier, line 161);
- the exit after stage 4 is the network's own head: pooling and ``fc`` (lines 247-250), with
  ``head_norm`` a norm and a ReLU first.

Deviations, each stated: the trunk is the project's pre-activation ResNet, whose stage outputs are not
normalised (the authors' ResNet is post-activation); the attention's upsampling goes back to the
stage's exact size (``F.interpolate(size=...)``: their ``scale_factor=2`` fails on odd sizes such as
Fashion-MNIST's 7x7 stage 3); the norm is the run's ``norm`` (theirs: BatchNorm in the main ResNet).

Pure PyTorch; nothing imports Flower.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from resist_fl.core.norms import make_norm
from resist_fl.core.preact_resnet import ResNetShape, add_trunk, pooled, widths_of


class SepConv(nn.Module):
    """DepthFL's separable convolution (``resnet.py`` lines 47-89): depthwise 3x3 (stride ``stride``),
    pointwise 1x1, norm, ReLU, depthwise 3x3, pointwise 1x1 to ``channels_out``, norm, ReLU."""

    def __init__(self, channels_in: int, channels_out: int, norm: str, stride: int = 2) -> None:
        super().__init__()
        self.operations = nn.Sequential(
            nn.Conv2d(channels_in, channels_in, 3, stride=stride, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_in, 1, bias=False), make_norm(norm, channels_in), nn.ReLU(),
            nn.Conv2d(channels_in, channels_in, 3, stride=1, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_out, 1, bias=False), make_norm(norm, channels_out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.operations(x)


class Attention(nn.Module):
    """DepthFL's attention gate of an early exit: sigmoid(upsample(ReLU(norm(SepConv(x)))))."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.sepconv = SepConv(channels, channels, norm)
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.relu(self.norm(self.sepconv(x)))
        return torch.sigmoid(F.interpolate(gate, size=x.shape[-2:], mode="bilinear", align_corners=False))


class EarlyExit(nn.Module):
    """The classifier after stage ``stage`` (0-based) < 3: attention gate, SepConvs to the last stage's
    channels, pooling, linear."""

    def __init__(self, stage: int, widths: tuple[int, ...], num_classes: int, norm: str) -> None:
        super().__init__()
        self.attention = Attention(widths[stage], norm)
        self.scala = nn.Sequential(*(SepConv(widths[s], widths[s + 1], norm) for s in range(stage, 3)))
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.scala(self.attention(x) * x)
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))


class FinalExit(nn.Module):
    """The classifier after the last stage: (``head_norm``: norm and ReLU), pooling, linear."""

    def __init__(self, width: int, num_classes: int, norm: str, head_norm: bool) -> None:
        super().__init__()
        self.norm = make_norm(norm, width) if head_norm else None
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled(x, self.norm))


class MultiExitResNet(nn.Module):
    """The pre-activation ResNet cut after ``spec.exits`` stages, with an exit after each
    (``exits.0`` ... : the keys of a shallower model are a subset of a deeper one's).

    ``forward`` returns the mean of the exits' logits (DepthFL's ensemble prediction,
    ``models.py`` lines 213-215 of the authors' code); :meth:`exit_logits` returns each exit's.
    """

    def __init__(self, spec: ResNetShape) -> None:
        super().__init__()
        self.spec = spec
        widths = widths_of(spec)
        add_trunk(self, spec, spec.exits)
        self.exits = nn.ModuleList(
            EarlyExit(s, widths, spec.num_classes, spec.norm) if s < 3
            else FinalExit(widths[3], spec.num_classes, spec.norm, spec.head_norm) for s in range(spec.exits))

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, shallowest first."""
        out = self.stem(self.conv1(x))
        logits = []
        for s, exit_head in enumerate(self.exits):
            out = getattr(self, f"layer{s + 1}")(out)
            logits.append(exit_head(out))
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble(self.exit_logits(x))


def ensemble(logits: list[torch.Tensor]) -> torch.Tensor:
    """DepthFL's prediction from its exits' logits: their mean."""
    return torch.stack(logits).mean(0)
