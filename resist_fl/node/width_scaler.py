"""HeteroFL's *scaler* (Diao, Ding, Tarokh, ICLR 2021): while training, a width-``r`` sub-model divides
the input of every normalisation layer by ``r``; at evaluation it does nothing.

Where, as its code applies it (``src/models/resnet.py`` of diaoenmao/HeteroFL-Computation-and-
Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients, lines 45 and 48:
``self.n1(self.scaler(x))``, ``self.n2(self.scaler(out))``; ``Scaler`` in ``src/modules/modules.py``
lines 9-10: ``input / self.rate if self.training else input``): in front of each block's two norms,
and in front of the final norm before the head (line 148), which the pre-activation ResNet here has
with ``head-norm = true`` (``head_norm``; the ResIST paper's model has none, and then that third
position has no counterpart). Either way the logits are never scaled. In front of a BatchNorm or
GroupNorm with batch statistics the division cancels (up to the norm's epsilon), as it does in
HeteroFL's code, where every BatchNorm trains on batch statistics (``track_running_stats=False``,
``resnet.py`` lines 16-17).
"""

from __future__ import annotations

from torch import nn

from resist_fl.core.norms import NORM_LAYERS


class _Scale:
    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: tuple):
        return (inputs[0] / self.rate, *inputs[1:]) if module.training else None


def attach_width_scaler(model: nn.Module, rate: float) -> nn.Module:
    """Divide the input of every normalisation layer of ``model`` by ``rate`` in training mode (in place)."""
    if not 0 < rate <= 1:
        raise ValueError(f"width rate = {rate!r}: expected a number in (0, 1]")
    if rate < 1:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                module.register_forward_pre_hook(_Scale(rate))
    return model
