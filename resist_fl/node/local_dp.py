"""Local differential privacy on a node: DP-SGD with Opacus on whatever sub-network it received.

``dp='local'``: every step clips each example's gradient to ``dp-clip`` and adds Gaussian noise of
``dp-noise-multiplier x dp-clip`` to their sum (Opacus' ``GradSampleModule`` and ``DPOptimizer``),
over a batch drawn by Poisson sampling (each example independently with rate
``batch-size / partition size``), which is what Opacus' RDP accountant assumes. The noise and the
Poisson draws come from generators seeded from OS entropy (:mod:`resist_fl.core.secure_random`),
never from the run seed, the round or the partition id, which the server knows (with those, the
server could replay the noise and subtract it); Opacus' ``secure_mode`` noise (the sum of four
draws, against floating-point attacks) is used on top. The accountant's history lives in the
node's ledger on its own disk (:mod:`resist_fl.node.dp_ledger`), so the ``dp-epsilon`` a node
reports is its cumulative epsilon over every round it trained (at ``dp-delta``), across SuperNode
restarts and resumed runs: a guarantee for its own examples at the run config's noise, whatever the
server does with the update. The node's own ceiling, which no run config can raise, is the node config's
``dp-max-epsilon`` (:mod:`resist_fl.node.dp_budget`).
Per-sample gradients need a model without BatchNorm (the settings refuse it: ``norm='groupnorm'``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from resist_fl.core.secure_random import secure_torch_generator
from resist_fl.data.batches import TrainBatches
from resist_fl.node.dp_ledger import History
from resist_fl.node.training import TrainResult



@dataclass(frozen=True)
class PrivateTraining:
    """What a round of DP-SGD produced: the training result, the node's cumulative epsilon and
    the accountant history to keep for the next round."""

    result: TrainResult
    epsilon: float
    history: History


def check_private_model(model: nn.Module) -> None:
    """ValueError naming the layers Opacus cannot train privately (BatchNorm: use GroupNorm)."""
    from opacus.validators import ModuleValidator  # Opacus only where local DP runs (see train_private)

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"dp='local': the model has layers Opacus cannot train with per-sample gradients "
                         f"({'; '.join(str(e) for e in errors[:3])}); set norm='groupnorm'")


def sample_rate(batch_size: int, examples: int) -> float:
    """The Poisson sampling rate of DP-SGD on ``examples`` with expected batch ``batch_size``: what the
    accountant charges and what the sampler draws with (the node's budget check charges the same)."""
    return min(1.0, batch_size / examples)


def train_private(model: nn.Module, loader: TrainBatches, *, steps: int, lr: float, momentum: float,
                  weight_decay: float, noise_multiplier: float, clip: float, delta: float,
                  history: Sequence[tuple[float, float, int]] = ()) -> PrivateTraining:
    """``steps`` DP-SGD steps on ``model`` (in place, on the CPU or the loader's device) over
    Poisson-sampled batches of ``loader``; the accountant continues from ``history``.

    Opacus is imported here, not with the module: it pulls in ``torch.distributed``, whose import once
    failed in Flower's simulation process ("cannot import name 'ShardedTensor'", a partly initialised
    module) while the ServerApp's thread was running there, and a ClientApp without local DP need not
    load it."""
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    check_private_model(model)
    start = time.perf_counter()
    count = len(loader.data)
    rate = sample_rate(loader.batch_size, count)
    device = loader.data.device
    model.to(device).train()
    private = GradSampleModule(model)
    noise = secure_torch_generator(device)  # OS entropy: nothing the server knows reproduces it
    optimiser = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay),
                            noise_multiplier=noise_multiplier, max_grad_norm=clip,
                            expected_batch_size=loader.batch_size, generator=noise, secure_mode=True)
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    optimiser.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
    draws = secure_torch_generator(device)  # the Poisson sample: secret as well
    total, trained = torch.zeros((), device=device), 0
    for _ in range(steps):
        chosen = torch.nonzero(torch.rand(count, generator=draws, device=device) < rate).flatten()
        if chosen.numel() == 0:  # an empty Poisson batch (probability (1 - q)^n): counted, not trained
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=rate)
            continue
        images, labels = loader.batch(chosen)
        loss = nn.functional.cross_entropy(private(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.detach().float()
        trained += 1
    private._close()  # remove Opacus' hooks: the model goes back to being a plain module
    mean_loss = (total / max(1, trained)).item()
    epsilon = float(accountant.get_epsilon(delta))
    return PrivateTraining(TrainResult(loss=mean_loss, steps=steps, seconds=time.perf_counter() - start),
                           epsilon, [tuple(h) for h in accountant.history])
