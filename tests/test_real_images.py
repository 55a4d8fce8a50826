"""Real images through the path a user's own files take: scikit-learn's bundled 8x8 digits
written as an ``.npz``, trained by the real ServerApp and ClientApp (in-process grid).

Synthetic data once hid a transform that destroyed real images (CIFAR's crop and flip on
8x8 grayscale digits: about 0.3 accuracy); these tests fail if that comes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resist_fl.run.outputs import read_metrics
from tests.appdriver import run_inprocess

# A short run of a small PreActResNet (stage depths 1-1-4-1, width 8; 3 partitionable blocks),
# 2 nodes, 6 rounds of 20 local steps. Measured final accuracy on the 360 test digits:
# augment=auto 0.986 (ResIST) / 0.992 (FedAvg), augment=crop-flip 0.833 / 0.817.
GOOD = 0.93


def run_digits(config: dict, digits_npz: str, strategy: str, augment: str) -> list[dict]:
    name = f"{strategy}-{augment}"
    config.update({"dataset": "npz", "data-path": digits_npz, "stage-depths": "1,1,4,1", "base-width": 8,
                   "local-steps": 20, "batch-size": 32, "num-server-rounds": 6, "eval-batch-size": 360,
                   "strategy": strategy, "augment": augment, "run-name": name})
    run_inprocess(config, num_nodes=2)
    return read_metrics(Path(config["output-dir"]) / name)


@pytest.mark.parametrize("strategy", ["resist", "fedavg"])
def test_default_augment_trains_real_digits_well(tiny_config, digits_npz, strategy):
    rows = run_digits(tiny_config, digits_npz, strategy, "auto")
    assert rows[-1]["accuracy"] >= GOOD, [r["accuracy"] for r in rows]
    recorded = json.loads((Path(tiny_config["output-dir"]) / f"{strategy}-auto" / "run_config.json").read_text())
    assert recorded["data"]["augment"] == "none"  # auto: no CIFAR recipe on a user's own images
    assert recorded["data"]["image-shape"] == [1, 8, 8]


def test_cifar_augmentation_hurts_small_digits(tiny_config, digits_npz):
    """What ``auto`` avoids: the same run with crop-flip ends well below it."""
    rows = run_digits(tiny_config, digits_npz, "resist", "crop-flip")
    assert rows[-1]["accuracy"] < GOOD, [r["accuracy"] for r in rows]
