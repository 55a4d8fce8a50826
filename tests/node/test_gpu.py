"""The GPU path on a real GPU (skipped without CUDA; benchmarks/gpu_check.sh runs these)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resist_fl.core.model import ModelSpec, build_model
from resist_fl.data import EvalBatches, TrainBatches, load_test_set, normalization
from resist_fl.data.arrays import ImageArrays
from resist_fl.node.device_cache import DeviceCache
from resist_fl.node.peak_memory import PeakMemory
from resist_fl.node.training import evaluate, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def test_bf16_channels_last_training_and_fp32_evaluation_on_the_gpu():
    torch.manual_seed(0)
    model = build_model(ModelSpec(depths=(1, 1, 2, 1), num_classes=10, in_channels=1, base_width=16))
    stats = normalization("digits")
    train_set = load_test_set("digits")  # small and real; the point is the device path, not accuracy
    batches = TrainBatches(train_set, 32, normalization=stats, device=CUDA, drop_last=True)
    assert {len(b[1]) for b in batches} == {32}
    with PeakMemory(CUDA) as peak:
        result = train(model, batches, steps=30, lr=0.05, momentum=0.9, weight_decay=5e-4, device=CUDA, amp=True)
    assert math.isfinite(result.loss) and peak.measure and peak.megabytes > 0
    assert next(model.parameters()).is_cuda and not torch.backends.cudnn.benchmark
    loss, accuracy = evaluate(model, EvalBatches(train_set, 128, normalization=stats, device=CUDA), CUDA, amp=True)
    assert math.isfinite(loss) and accuracy > 0.3


def test_the_device_cache_keeps_what_fits_on_the_gpu():
    images = ImageArrays(np.zeros((100, 1, 8, 8), np.uint8), np.zeros(100, np.int64))
    cache = DeviceCache(CUDA, max_bytes=100 * (64 + 8))
    assert cache.get("a", lambda: images).device.type == "cuda"
    assert cache.get("b", lambda: images).device.type == "cuda" and "a" not in cache.entries
    big = ImageArrays(np.zeros((1000, 1, 8, 8), np.uint8), np.zeros(1000, np.int64))
    held = cache.get("big", lambda: big)
    assert held.device.type == "cpu" and held.images.is_pinned()
