"""Any residual network: torchvision ResNets decomposed by name, scaled without editing their
block class, sub-networks that skip blocks and keep the global names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resist_fl.core.aggregation import merge_partial
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.residual_nets import find_stages, set_residual_scales, skip_blocks, subnetwork_of

pytest.importorskip("torchvision")
from resist_fl.core.model import ModelSpec, build_model  # noqa: E402
from resist_fl.core.torchvision_resnets import TORCHVISION_DEPTHS  # noqa: E402


def torchvision_resnet(name: str, num_classes: int = 10, in_channels: int = 3, stem: str = "cifar",
                       image_size: int = 32, stages: tuple[str, ...] = ("layer3",)) -> tuple[nn.Module, BlockLayout]:
    """The torchvision ResNet ``name`` (``"resnet50"``) and its layout with ``stages`` partitioned."""
    arch = f"torchvision_{name}"
    if arch not in TORCHVISION_DEPTHS:
        raise ValueError(f"unknown torchvision ResNet {name!r}; expected one of "
                         f"{', '.join(a.removeprefix('torchvision_') for a in TORCHVISION_DEPTHS)}")
    spec = ModelSpec(depths=TORCHVISION_DEPTHS[arch], num_classes=num_classes, in_channels=in_channels,
                     base_width=64, norm="batchnorm-running", arch=arch, stem=stem)
    model = build_model(spec)
    return model, BlockLayout.from_model(model, torch.zeros(2, in_channels, image_size, image_size), stages)


@pytest.fixture(scope="module", name="resnet50")
def fixture_resnet50():
    torch.manual_seed(0)
    return torchvision_resnet("resnet50", num_classes=10)


def test_layout_of_a_torchvision_resnet50(resnet50):
    model, layout = resnet50
    assert layout.partitionable == tuple(f"layer3.{i}" for i in range(1, 6))  # 6 bottlenecks, the first strided
    assert "layer3.0.conv1.weight" in layout.shared_keys and "layer3.1.residual_scale" in layout.keys
    assert "layer3.1.residual_scale" not in layout.payload_keys()  # the server owns the scales
    assert find_stages(model) == ["layer1", "layer2", "layer3", "layer4"]


def test_subnetwork_keys_and_output_equal_the_full_model_with_blocks_skipped(resnet50):
    model, layout = resnet50
    kept = ["layer3.2", "layer3.5"]
    dropped = layout.dropped_blocks(kept)
    sub = subnetwork_of(model, dropped).eval()
    assert tuple(sub.state_dict()) == layout.subnetwork_keys(kept)  # the global names minus the dropped
    x = torch.randn(2, 3, 32, 32)
    full = model.eval()
    set_residual_scales(full, {b: 0.0 for b in dropped})  # a post-activation block at scale 0 is an identity
    try:
        torch.testing.assert_close(sub(x), full(x))
        set_residual_scales(sub, {"layer3.2": 0.5})  # the scale reaches the copy's own hook ...
        assert not torch.allclose(sub(x), full(x))
        assert float(model.layer3[2].residual_scale) == 1.0  # ... and not the original's
    finally:
        set_residual_scales(full, {b: 1.0 for b in layout.partitionable})


def test_split_train_merge_round_trip(resnet50):
    model, layout = resnet50
    kept = ["layer3.1", "layer3.4"]
    sub = subnetwork_of(model, layout.dropped_blocks(kept)).train()
    before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k in layout.payload_keys()}
    optimiser = torch.optim.SGD(sub.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(sub(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimiser.step()
    update = {k: v.detach().numpy() for k, v in sub.state_dict().items() if k in layout.payload_keys(kept)}
    merged = merge_partial(before, [update], [1.0])
    for key in layout.payload_keys():
        expected = update[key] if key in update else before[key]
        np.testing.assert_array_equal(merged[key], expected)
    changed = [k for k in update if not np.array_equal(update[k], before[k])]
    assert any(k.startswith("layer3.4.") for k in changed) and not any(k.startswith("layer3.2.") for k in merged
                                                                       if not np.array_equal(merged[k], before[k]))


def test_named_stages_and_bad_blocks_are_checked():
    torch.manual_seed(0)
    model, layout = torchvision_resnet("resnet18", stages=("layer2", "layer4"))
    assert layout.partitionable == ("layer2.1", "layer4.1")
    with pytest.raises(ValueError, match="stage 'layer9': ResNet has no such module"):
        BlockLayout.from_model(model, torch.zeros(1, 3, 32, 32), ["layer9"])
    with pytest.raises(ValueError, match="the first block of a stage changes the shape"):
        skip_blocks(model, ["layer2.0"])
    with pytest.raises(ValueError, match="unknown torchvision ResNet 'resnet20'"):
        torchvision_resnet("resnet20")


def test_run_config_selects_a_torchvision_resnet_end_to_end(tiny_config):
    from pathlib import Path

    from resist_fl.run.outputs import load_model, read_metrics
    from simulations.inprocess import run_inprocess

    tiny_config.update({"model": "torchvision_resnet18", "stage-depths": "", "num-server-rounds": 1,
                        "local-steps": 2, "batch-size": 16})
    # torchvision fixes its own width: the tiny config's base-width 8 would be refused (64, torchvision's, is accepted)
    tiny_config.pop("base-width")
    run_inprocess(tiny_config, num_nodes=2)
    run_dir = Path(tiny_config["output-dir"]) / tiny_config["run-name"]
    row = read_metrics(run_dir)[0]
    assert row["replies-accepted"] == 2 and 0 <= row["accuracy"] <= 1 and row["inference-scale"] == 1.0
    model = load_model(run_dir / "model.pt")  # nothing but the saved spec rebuilds it
    assert type(model).__name__ == "ResNet" and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)



