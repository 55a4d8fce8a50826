"""Shared fixtures: a tiny, fast run config on synthetic data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "dataset": "synthetic", "stage-depths": "1,1,4,1", "base-width": 8, "local-steps": 8,
    "batch-size": 32, "eval-batch-size": 250, "num-server-rounds": 2, "run-name": "test",
}


def default_run_config() -> dict:
    """The app's defaults, as pyproject.toml declares them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


@pytest.fixture
def tiny_config(tmp_path):
    """Run config of a tiny model on synthetic data writing under ``tmp_path``."""
    return {**default_run_config(), **TINY_OVERRIDES, "output-dir": str(tmp_path / "runs")}


def write_digits_npz(path: Path) -> str:
    """scikit-learn's bundled 8x8 handwritten digits (1797 real images, 10 classes) as a user's
    own ``.npz``: uint8 grayscale NHW, a fixed 1437 / 360 train / test split."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1437], order[1437:]
    np.savez(path, x_train=images[train], y_train=digits.target[train],
             x_test=images[test], y_test=digits.target[test])
    return str(path)


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> str:
    """Path of the real digits image set written as a user's ``.npz``."""
    return write_digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz")
