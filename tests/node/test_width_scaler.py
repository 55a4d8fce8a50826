"""HeteroFL's scaler in front of the norms: a BatchNorm-ed (or GroupNorm-ed) output is unchanged and the
training logits are not scaled (the scaler used to divide every convolution's output, which multiplied
the logits by 1/r)."""

from __future__ import annotations

import copy

import pytest
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.width_slicing import sliced_spec
from resist_fl.node.width_scaler import attach_width_scaler


@pytest.mark.parametrize("head_norm", [False, True])
@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_the_scaler_cancels_in_front_of_a_norm_and_leaves_the_logits_unscaled(norm, head_norm):
    spec = sliced_spec(ModelSpec(depths=(1, 1, 2, 1), base_width=16, num_classes=10, norm=norm,
                                 head_norm=head_norm), 0.25)
    torch.manual_seed(0)
    plain = build_model(spec).train()
    scaled = attach_width_scaler(copy.deepcopy(plain), 0.25)
    x = torch.randn(8, 3, 16, 16)
    out_plain, out_scaled = plain(x), scaled(x)
    torch.testing.assert_close(out_scaled, out_plain, rtol=2e-3, atol=2e-3)  # only the norms' epsilon differs
    assert out_scaled.abs().mean() < 1.5 * out_plain.abs().mean()  # not x 1/r = 4
    hooked = [m for m in scaled.modules() if m._forward_pre_hooks]
    assert hooked and all(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in hooked)
    assert (plain.head_norm is not None) == head_norm and (not head_norm or scaled.head_norm._forward_pre_hooks)
    scaled.eval(), plain.eval()
    torch.testing.assert_close(scaled(x), plain(x))  # evaluation: no scaling at all


def test_a_full_width_model_gets_no_scaler_and_a_bad_rate_is_refused():
    model = build_model(ModelSpec(depths=(1, 1, 1, 1), base_width=8, num_classes=10))
    assert not any(m._forward_pre_hooks for m in attach_width_scaler(model, 1.0).modules())
    with pytest.raises(ValueError, match="width rate = 0: expected a number in"):
        attach_width_scaler(model, 0)
