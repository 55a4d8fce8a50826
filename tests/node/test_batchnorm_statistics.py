"""HeteroFL's static BatchNorm: statistics re-estimated over training data equal the average of each
BatchNorm input's batch statistics in a training-mode pass; the run option evaluates with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.node.batchnorm_statistics import with_training_statistics
from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import RunSettings, SettingsError
from simulations.inprocess import run_inprocess

SPEC = ModelSpec(depths=(1, 1, 2, 1), base_width=8, num_classes=10)


def test_the_statistics_are_the_average_of_the_batches_statistics():
    torch.manual_seed(0)
    plain = build_model(SPEC).train()  # batch statistics, no running buffers
    batches = [(torch.randn(n, 3, 16, 16) + 0.5, torch.zeros(n, dtype=torch.long)) for n in (8, 5, 8)]
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, module in plain.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(lambda m, inputs, name=name: seen.setdefault(name, []).append(
                (inputs[0].mean(dim=(0, 2, 3)), inputs[0].var(dim=(0, 2, 3), unbiased=True))))
    with torch.no_grad():
        for images, _ in batches:
            plain(images)
    model = with_training_statistics(SPEC, plain.state_dict(), batches, torch.device("cpu"))
    assert not model.training
    modules = dict(model.named_modules())
    for name, stats in seen.items():
        torch.testing.assert_close(modules[name].running_mean, torch.stack([m for m, _ in stats]).mean(0))
        torch.testing.assert_close(modules[name].running_var, torch.stack([v for _, v in stats]).mean(0))
    x = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(model(x), plain.eval()(x))  # evaluation uses them, not the test batch's


def test_the_option_is_refused_where_it_has_no_meaning(tiny_config):
    with pytest.raises(ValueError, match="norm = 'groupnorm'"):
        with_training_statistics(ModelSpec(depths=(1, 1, 2, 1), norm="groupnorm"), {}, [], torch.device("cpu"))
    with pytest.raises(SettingsError, match="bn-statistics = 'training-data': re-estimating"):
        RunSettings.from_run_config({**tiny_config, "bn-statistics": "training-data", "norm": "groupnorm"})
    with pytest.raises(SettingsError, match="bn-statistics = 'training-data': the server would compute"):
        RunSettings.from_run_config({**tiny_config, "bn-statistics": "training-data", "dp": "central",
                                     "weighting": "uniform"})


def test_a_run_evaluates_with_the_re_estimated_statistics(tiny_config):
    tiny_config.update({"dataset": "digits", "strategy": "heterofl", "capacity-profile": "1.0,0.5",
                        "min-train-nodes": 2, "min-available-nodes": 2, "num-server-rounds": 2,
                        "eval-batch-size": 360, "bn-statistics": "training-data"})
    run_inprocess(tiny_config, num_nodes=2)
    rows = read_metrics(Path(tiny_config["output-dir"]) / tiny_config["run-name"])
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["accuracy"] > 0.3
    run_inprocess({**tiny_config, "bn-statistics": "batch", "run-name": "batch"}, num_nodes=2)
    batch = read_metrics(Path(tiny_config["output-dir"]) / "batch")
    # the option changes the evaluation only: the same training, another test loss
    assert [r["train-loss"] for r in rows] == [r["train-loss"] for r in batch]
    assert all(r["loss"] != b["loss"] for r, b in zip(rows, batch))
