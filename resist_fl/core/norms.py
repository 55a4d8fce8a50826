"""The normalisation layers every model family can be built with (the bottom layer of the core,
beside the residual-scale primitives)."""

from __future__ import annotations

import math

from torch import nn

NORMS = ("batchnorm", "batchnorm-running", "groupnorm")
"""Normalisation layers: the paper's BatchNorm without running statistics
(batch statistics also at test time), BatchNorm with running statistics, and
GroupNorm (no batch statistics at all)."""
NORM_LAYERS = (nn.BatchNorm2d, nn.GroupNorm)
"""The module classes :func:`make_norm` builds."""


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build the normalisation layer ``norm`` for ``channels`` channels."""
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "batchnorm-running":
        return nn.BatchNorm2d(channels)
    if norm == "groupnorm":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
