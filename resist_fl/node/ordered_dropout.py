"""FjORD's ordered dropout on a node (Horváth et al., NeurIPS 2021), with or without its
self-distillation (:meth:`OrderedDropout.distillation_loss`): the node holds its largest sub-model
(width ``p_max``: the first ``p_max * C`` channels of every layer) and, for every local batch,
samples a width ``p`` uniformly from the discrete set at or below ``p_max`` and trains the nested
sub-model ``p`` — the first ``p * C`` channels of every channel group — by zeroing the outputs of
every convolution and normalisation layer beyond them. With BatchNorm this is exactly the nested
sub-model's forward pass (a zeroed channel stays zero through the block); with GroupNorm the kept
channels' groups see zeros, an approximation. The sampled widths are nested and never above
``p_max``. FjORD's code keeps separate BatchNorm running statistics per width with shared affine
parameters (``od/layers/batch_norm.py`` lines 32-45 of adap/flower's ``baselines/fjord``); here one
BatchNorm's running statistics see every width's batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from resist_fl.core.model import ModelSpec
from resist_fl.core.width_slicing import channel_groups, key_groups, sliced_spec

_MASKED = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)


class OrderedDropout:
    """Ordered dropout on ``model`` (the width-``max_rate`` sub-model of ``spec``).

    Call :meth:`sample` before every step (``train(..., before_step=od.sample)``); the widths
    drawn are in :attr:`drawn`.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, max_rate: float, rates: Sequence[float], seed: int) -> None:
        self.rates = tuple(sorted({float(r) for r in rates if r <= max_rate + 1e-12}))
        if not self.rates or max(self.rates) != max_rate:
            raise ValueError(f"rates {list(rates)}: expected a set that includes the node's width {max_rate}")
        self.max_rate, self.rate = max_rate, max_rate
        self.rng = np.random.default_rng(seed)
        self.drawn: list[float] = []
        self.sizes = {rate: channel_groups(sliced_spec(spec, rate)) for rate in self.rates}
        groups = key_groups(spec, list(model.state_dict()))
        self._masks: dict[tuple[str, float], torch.Tensor] = {}
        for name, module in model.named_modules():
            if isinstance(module, _MASKED):
                group = groups[f"{name}.weight"][0]
                if group is not None:
                    module.register_forward_hook(self._hook(group))

    def sample(self, _step: int = 0) -> float:
        """Draw this step's width (uniform over the rates at or below ``p_max``)."""
        self.rate = float(self.rng.choice(self.rates))
        self.drawn.append(self.rate)
        return self.rate

    def distillation_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """FjORD's self-distillation step (its code, ``baselines/fjord/fjord/models.py`` lines 251-258 of
        adap/flower): cross-entropy of the node's largest width on the labels, plus cross-entropy of
        the width drawn for this step against the largest width's detached softmax (temperature 1, no
        weight; the drawn width gets no label loss). One backward of the sum is the code's two
        backward passes before one step."""
        drawn = self.rate
        self.rate = self.max_rate
        teacher = model(images).float()
        self.rate = drawn
        student = model(images).float()
        return (nn.functional.cross_entropy(teacher, labels)
                + nn.functional.cross_entropy(student, teacher.detach().softmax(dim=1)))

    def _hook(self, group: str):
        def mask_output(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
            if not module.training or self.rate >= self.max_rate:
                return output
            key = (group, self.rate)
            if key not in self._masks or self._masks[key].device != output.device:
                kept = torch.zeros(output.shape[1], dtype=output.dtype, device=output.device)
                kept[: self.sizes[self.rate][group]] = 1
                self._masks[key] = kept.view(1, -1, 1, 1)
            return output * self._masks[key]

        return mask_output
