"""The PreActResNet family: paper parameter counts, norms, scales, sub-networks."""

import pytest
import torch

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.norms import NORMS
from resist_fl.core.preact_resnet import PreActBlock
from resist_fl.core.residual_nets import set_residual_scales, skip_blocks

TINY = ModelSpec(depths=(1, 1, 4, 1), base_width=8, num_classes=10)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("num_classes, expected", [(10, 41_350_730), (100, 41_396_900)])
def test_resnet101_parameter_count_matches_official_code(num_classes, expected):
    with torch.device("meta"):
        assert n_params(build_model(ModelSpec.from_name("preact_resnet101", num_classes=num_classes))) == expected


def test_presets_have_paper_stage_depths():
    with torch.device("meta"):
        model = build_model(ModelSpec.from_name("preact_resnet101"))
    assert [len(getattr(model, f"layer{s}")) for s in range(1, 5)] == [3, 4, 23, 3]
    assert isinstance(model.layer3[0], PreActBlock) and model.layer3[0].changes_shape


def test_block_uses_preactivated_input_for_projection_shortcut():
    block = PreActBlock(4, 8, stride=2, norm="groupnorm").eval()
    x = torch.randn(2, 4, 8, 8)
    pre = torch.relu(block.bn1(x))
    branch = block.conv2(torch.relu(block.bn2(block.conv1(pre))))
    torch.testing.assert_close(block(x), branch + block.shortcut(pre))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("size", [32, 24, 64])
def test_forward_for_every_norm_and_input_size(norm, size):
    model = build_model(ModelSpec(depths=(1, 1, 2, 1), base_width=8, in_channels=1, norm=norm,
                                  num_classes=7)).eval()
    assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_batchnorm_modes():
    paper = build_model(TINY)
    running = build_model(ModelSpec(depths=TINY.depths, base_width=8, norm="batchnorm-running"))
    assert not any("running_mean" in k for k in paper.state_dict())
    assert any("running_mean" in k for k in running.state_dict())


def test_residual_scales_are_saved_and_restored_by_the_state_dict():
    model = build_model(TINY).eval()
    set_residual_scales(model, {"layer3.1": 0.25, "layer3.2": 0.5})
    clone = build_model(TINY).eval()
    clone.load_state_dict(model.state_dict())
    assert clone.layer3[1].residual_scale.item() == 0.25
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(clone(x), model(x))
    with pytest.raises(ValueError, match="layer9.0"):
        set_residual_scales(model, {"layer9.0": 1.0})


@pytest.mark.parametrize("held", [(), ("layer3.1",), ("layer3.2", "layer3.3"), ("layer3.1", "layer3.2", "layer3.3")])
def test_subnetwork_equals_full_model_with_blocks_skipped(held):
    torch.manual_seed(0)
    layout = BlockLayout.from_spec(TINY)
    full = build_model(TINY).eval()
    sub = layout.build_subnetwork(TINY, held).eval()
    assert tuple(sub.state_dict()) == layout.subnetwork_keys(held)
    sub.load_state_dict({k: v for k, v in full.state_dict().items() if k in sub.state_dict()})
    # A residual scale of 0 turns a same-shape block into the identity.
    set_residual_scales(full, {b: 0.0 for b in layout.dropped_blocks(held)})
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(sub(x), full(x))


def test_subnetwork_memory_follows_its_depth():
    layout = BlockLayout.from_spec(TINY)
    small = layout.build_subnetwork(TINY, ["layer3.1"])
    full = build_model(TINY)
    block = sum(p.numel() for p in full.layer3[1].parameters())
    assert n_params(full) - n_params(small) == 2 * block


def test_strided_blocks_cannot_be_dropped_and_unknown_blocks_are_named():
    with pytest.raises(ValueError, match="layer3.0"):
        skip_blocks(build_model(TINY), ["layer3.0"])
    with pytest.raises(ValueError, match="layer3.9"):
        skip_blocks(build_model(TINY), ["layer3.9"])
    with pytest.raises(ValueError, match="layer3.9"):
        BlockLayout.from_spec(TINY).build_subnetwork(TINY, ["layer3.9"])


def test_spec_validation_and_round_trip():
    spec = ModelSpec.from_name("preact_resnet34", num_classes=100, base_width=16, norm="groupnorm")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="resnet99"):
        ModelSpec.from_name("resnet99")
    with pytest.raises(ValueError, match="layernorm"):
        ModelSpec(norm="layernorm")
    with pytest.raises(ValueError, match="depths"):
        ModelSpec(depths=(1, 0, 1, 1))


def test_width_multiplier_and_presets():
    with torch.device("meta"):
        narrow = build_model(ModelSpec.from_name("preact_resnet18", base_width=16))
        wide = build_model(ModelSpec.from_name("preact_resnet18"))
    assert narrow.linear.in_features == 128 and wide.linear.in_features == 512
