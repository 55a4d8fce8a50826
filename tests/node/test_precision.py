"""amp on any device: bf16 autocast trains and evaluates on the CPU, loss and argmax in fp32, the
logs name the precision, and GPU batches have one shape."""

from __future__ import annotations

import math

import numpy as np
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.data import EvalBatches, TrainBatches, load_partition, load_test_set, normalization
from resist_fl.data.arrays import ImageArrays
from resist_fl.data.transforms import Normalization
from resist_fl.node.training import evaluate, precision, train
from simulations.inprocess import run_inprocess


def _digits_run(amp: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(depths=(1, 1, 2, 1), num_classes=10, in_channels=1, base_width=8))
    stats = normalization("digits")
    part = load_partition("digits", 0, 1, partitioner="iid", alpha=0.5, seed=0)
    loader = TrainBatches(part, 32, normalization=stats, seed=0)
    result = train(model, loader, steps=120, lr=0.05, momentum=0.9, weight_decay=5e-4, device=torch.device("cpu"),
                   amp=amp)
    loss, accuracy = evaluate(model, EvalBatches(load_test_set("digits"), 360, normalization=stats),
                              torch.device("cpu"), amp=amp)
    return result.loss, loss, accuracy


def test_bf16_autocast_on_the_cpu_trains_and_evaluates_close_to_fp32():
    fp32, bf16 = _digits_run(False), _digits_run(True)
    assert all(math.isfinite(v) for v in (*fp32, *bf16))
    assert fp32[2] > 0.85 and bf16[2] > 0.85
    assert abs(bf16[2] - fp32[2]) < 0.05  # real digits, 120 steps: the two precisions agree
    assert bf16[0] != fp32[0]  # the autocast branch really ran


def test_evaluation_takes_loss_and_argmax_in_fp32(monkeypatch):
    seen = []
    real = torch.Tensor.argmax

    def spy(self, *args, **kwargs):
        seen.append(self.dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "argmax", spy)
    model = build_model(ModelSpec(depths=(1, 1, 1, 1), num_classes=10, in_channels=1, base_width=4))
    data = ImageArrays(np.zeros((6, 1, 8, 8), np.uint8), np.arange(6, dtype=np.int64) % 10)
    evaluate(model, EvalBatches(data, 3, normalization=Normalization((0.5,), (0.5,))), torch.device("cpu"), amp=True)
    assert seen == [torch.float32, torch.float32]


def test_the_start_up_logs_name_the_precision(tiny_config, caplog):
    tiny_config.update({"amp": True, "num-server-rounds": 1, "local-steps": 1})
    run_inprocess(tiny_config, num_nodes=2)
    assert precision(True) == "bf16 autocast" and precision(False) == "fp32"
    assert "nodes train in bf16 autocast" in caplog.text
    assert "resist-fl node: training on cpu in bf16 autocast" in caplog.text


def test_gpu_batches_have_one_shape():
    data = ImageArrays(np.zeros((70, 1, 8, 8), np.uint8), np.zeros(70, np.int64))
    stats = Normalization((0.5,), (0.5,))
    assert [len(b[1]) for b in TrainBatches(data, 32, normalization=stats, drop_last=True)] == [32, 32]
    assert [len(b[1]) for b in TrainBatches(data, 32, normalization=stats)] == [32, 32, 6]
    small = ImageArrays(np.zeros((20, 1, 8, 8), np.uint8), np.zeros(20, np.int64))
    assert [len(b[1]) for b in TrainBatches(small, 32, normalization=stats, drop_last=True)] == [20]
