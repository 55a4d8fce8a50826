"""HeteroFL's *scaler*: while training, a width-``r`` sub-model divides the output of every
convolution by ``r``, so its activations keep the full model's scale (Diao et al., ICLR 2021);
at evaluation the outputs are left alone."""

from __future__ import annotations

from torch import nn


class _Scale:
    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, _inputs, output):
        return output / self.rate if module.training else output


def attach_width_scaler(model: nn.Module, rate: float) -> nn.Module:
    """Divide every ``nn.Conv2d`` output of ``model`` by ``rate`` in training mode (in place)."""
    if not 0 < rate <= 1:
        raise ValueError(f"width rate = {rate!r}: expected a number in (0, 1]")
    if rate < 1:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(_Scale(rate))
    return model
