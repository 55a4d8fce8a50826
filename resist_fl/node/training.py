"""Local training and evaluation loops used by the ClientApp and the ServerApp."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""One pass of ``(images, labels)`` batches (e.g. :class:`resist_fl.data.batches.TrainBatches`)."""

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(model, images, labels)``: a step's loss, forward passes included (default: cross-entropy of one pass)."""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible to this process, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA GPU is visible to this process "
                           "(in simulation, set client-resources-num-gpus > 0)")
    return torch.device(device)


def scheduled_lr(base_lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """Learning rate of ``server_round`` (1-based) under ``schedule``.

    ``step`` divides by 10 after 50 % and again after 75 % of the rounds (the
    official ResIST schedule); ``cosine`` anneals to 0; ``constant`` keeps it.
    """
    progress = (server_round - 1) / max(1, num_rounds)
    if schedule == "step":
        return base_lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule {schedule!r}; expected step, cosine or constant")


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the local steps (NaN or Inf if training diverged)."""
    steps: int
    seconds: float


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``; on CUDA also to ``channels_last`` memory (what cuDNN's
    fastest convolution kernels, bf16 ones included, read).

    cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is left off: it tunes each new input
    shape once per process, and a round has several shapes (training batches, evaluation batches)
    while a deployed SuperNode starts a new ClientApp process for every message, so the tuning
    would be paid again every round; no GPU measurement here has shown it paying for itself.
    """
    if device.type != "cuda":
        return model.to(device)
    return model.to(device, memory_format=torch.channels_last)


def _to_device(images: torch.Tensor, labels: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` (a no-op for device-resident batches), channels_last on CUDA."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def _batches(loader: Batches, steps: int) -> Iterator:
    """``steps`` batches, cycling through the loader (reshuffled each pass)."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train(model: nn.Module, loader: Batches, *, steps: int, lr: float, momentum: float,
          weight_decay: float, device: torch.device, amp: bool = False,
          clip_grad_norm: float = 0.0, before_step: Callable[[int], None] | None = None,
          loss_fn: Loss | None = None) -> TrainResult:
    """Train ``model`` in place for ``steps`` SGD steps with a fresh optimiser.

    A fresh SGD optimiser (no momentum carried between rounds) matches the
    official code, which re-creates it at every repartition. With ``amp`` the
    forward pass runs under bfloat16 autocast (CUDA or CPU) and the loss is computed in fp32.
    ``clip_grad_norm > 0`` rescales each step's gradient to at most that L2 norm (over all
    parameters). ``before_step(step)`` is called before each step's forward pass (FjORD samples
    that step's width there: :mod:`resist_fl.node.ordered_dropout`); ``loss_fn(model, images, labels)``
    replaces the step's loss, forward passes included (FjORD's self-distillation). The step loop never waits
    for the device: the loss is summed on it and read once at the end.
    """
    start = time.perf_counter()
    on_device(model, device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = torch.zeros((), device=device)
    for step, (images, labels) in enumerate(_batches(loader, steps)):
        if before_step is not None:
            before_step(step)
        images, labels = _to_device(images, labels, device)
        if loss_fn is None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), labels)  # the loss in fp32 under amp
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model, images, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm, foreach=True)
        optimiser.step()
        total += loss.detach().float()
    mean_loss = (total / steps).item()  # non-finite when training diverged: the caller decides
    return TrainResult(loss=mean_loss, steps=steps, seconds=time.perf_counter() - start)


def steps_for(num_examples: int, batch_size: int, local_steps: int, local_epochs: int) -> int:
    """Local steps of one round: ``local_epochs`` passes when > 0, else ``local_steps``."""
    if local_epochs > 0:
        return local_epochs * max(1, math.ceil(num_examples / batch_size))
    return local_steps


@dataclass(frozen=True)
class ClassEvaluation:
    """Mean cross-entropy ``loss`` and, per label, the test images classified correctly and in all."""

    loss: float
    correct: np.ndarray
    count: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.count.sum())


Outputs = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
"""Named logits of one batch: ``""`` the model's prediction, other names parts of it scored alone."""


@torch.no_grad()
def evaluate_by_class(model: nn.Module, loader: Batches, device: torch.device, amp: bool = False) -> ClassEvaluation:
    """Loss of ``model`` on ``loader`` and its correct / total predictions per label (the label
    count is the model's number of outputs)."""
    return evaluate_outputs(model, loader, device, amp)[""]


@torch.no_grad()
def evaluate_outputs(model: nn.Module, loader: Batches, device: torch.device, amp: bool = False,
                     outputs: Outputs | None = None) -> dict[str, ClassEvaluation]:
    """:func:`evaluate_by_class` of every logits ``outputs(images)`` names, in one pass over ``loader``
    (``model`` in eval mode on ``device``; default: ``{"": model(images)}``)."""
    on_device(model, device).eval()
    forward = outputs or (lambda images: {"": model(images)})
    loss_sum: dict[str, torch.Tensor] = {}
    correct: dict[str, torch.Tensor] = {}
    count: torch.Tensor | None = None
    for images, labels in loader:
        images, labels = _to_device(images, labels, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            named = forward(images)
        for name, logits in named.items():
            logits = logits.float()  # loss and argmax in fp32: bf16 logits tie and round
            classes = logits.shape[1]
            if name not in correct:
                correct[name] = torch.zeros(classes, device=device, dtype=torch.int64)
                loss_sum[name] = torch.zeros((), device=device, dtype=torch.float64)
            loss_sum[name] += nn.functional.cross_entropy(logits, labels, reduction="sum")
            correct[name] += torch.bincount(labels[logits.argmax(1) == labels], minlength=classes)[:classes]
        classes = named[""].shape[1]
        count = (0 if count is None else count) + torch.bincount(labels, minlength=classes)[:classes]
    if count is None or int(count.sum()) == 0:
        raise ValueError("the evaluation set is empty")
    total, counts = int(count.sum()), count.cpu().numpy()
    return {name: ClassEvaluation(loss_sum[name].item() / total, correct[name].cpu().numpy(), counts)
            for name in correct}


def evaluate(model: nn.Module, loader: Batches, device: torch.device,
             amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``loader``."""
    result = evaluate_by_class(model, loader, device, amp)
    return result.loss, result.accuracy
