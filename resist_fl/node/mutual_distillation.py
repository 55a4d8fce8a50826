"""DepthFL's local loss: cross-entropy on every exit plus mutual self-distillation between them.

The authors' code (Flower's ``baselines/depthfl/depthfl/models.py``, adap/flower at fdef7af, lines
146-163 and the ``KLLoss`` of lines 12-32): for every exit i, ``CE(z_i, y)`` plus, for every other exit
j, ``weight * KL(softmax(z_j) || softmax(z_i)) / (n - 1)`` with temperature 1, the teacher ``z_j``
detached and ``1e-7`` added to its probabilities, the KL summed over classes and averaged over the
batch. The weight ramps up over the rounds (:func:`distillation_weight`).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

RAMPUP_SHARE = 0.3
"""The share of the run's rounds over which the distillation weight ramps up to 1: the authors ramp
over 300 of their 1000 rounds (``client.py`` lines 84-88); a run of R rounds ramps over 0.3 R."""


def distillation_weight(run_round: int, num_rounds: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = min(run_round, T) / T`` and ``T = max(1, 0.3 num_rounds)``
    (the authors' sigmoid ramp-up, its length scaled to the run)."""
    ramp = max(1.0, RAMPUP_SHARE * num_rounds)
    phase = 1.0 - min(max(run_round, 0), ramp) / ramp
    return float(math.exp(-5.0 * phase * phase))


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The authors' ``KLLoss`` (temperature 1): ``sum_c p_c (log p_c - log q_c)`` averaged over the
    batch, ``p = softmax(teacher) + 1e-7`` (detached), ``q = softmax(student)``."""
    target = (F.softmax(teacher.detach(), dim=1) + 1e-7)
    return (target * (target.log() - F.log_softmax(student, dim=1))).sum(1).mean()


def depthfl_loss(exit_logits: list[torch.Tensor], labels: torch.Tensor, weight: float) -> torch.Tensor:
    """Cross-entropy on every exit, plus ``weight`` times the mean KL of each exit to every other
    (no distillation with one exit or ``weight`` 0)."""
    n = len(exit_logits)
    loss = sum(F.cross_entropy(z, labels) for z in exit_logits)
    if weight > 0 and n > 1:
        loss = loss + weight * sum(kl_to_teacher(z_i, z_j) for i, z_i in enumerate(exit_logits)
                                   for j, z_j in enumerate(exit_logits) if j != i) / (n - 1)
    return loss


def mutual_distillation(weight: float):
    """The step loss (``loss(model, images, labels)``) of a :class:`~resist_fl.core.early_exits.MultiExitResNet`."""
    def loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return depthfl_loss([z.float() for z in model.exit_logits(images)], labels, weight)

    return loss
