"""Per-client accuracy from per-label accuracy and label mixes, against direct weighted evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resist_fl.core.client_accuracy import client_accuracies, fairness_summary


def test_client_accuracy_is_the_accuracy_on_the_clients_share_of_the_test_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    labels[labels == 4] = 3  # label 4 is absent from the test set: no weight for it
    right = rng.random(400) < 0.7
    counts = rng.integers(0, 30, (7, 5))
    counts[0] = [0, 0, 0, 0, 9]  # only the untested label ...
    counts[0, 2] = 1             # ... and one image of a tested one
    correct = np.bincount(labels[right], minlength=5)
    total = np.bincount(labels, minlength=5)
    got = client_accuracies(counts, correct, total)
    for client in range(7):  # each test image weighted p_c(y) / n_y, over the labels the test set has
        weight = np.where(total[labels] > 0, counts[client][labels] / np.maximum(total[labels], 1), 0.0)
        assert got[client] == pytest.approx((weight * right).sum() / weight.sum())
    assert got[0] == pytest.approx(correct[2] / total[2])


def test_bad_counts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="expected"):
        client_accuracies(np.ones((2, 3)), np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="correct <= count"):
        client_accuracies(np.ones((2, 2)), np.array([3, 0]), np.array([2, 2]))
    with pytest.raises(ValueError, match=r"clients \[1\] hold no image"):
        client_accuracies(np.array([[1, 0], [0, 4]]), np.array([1, 0]), np.array([2, 0]))


@pytest.mark.parametrize("clients", [1, 9, 10, 25, 100])
def test_the_fairness_summary_matches_numpy(clients):
    values = np.random.default_rng(clients).random(clients)
    summary = fairness_summary(values)
    worst = np.sort(values)[:max(1, math.ceil(clients / 10))]
    assert summary == pytest.approx({"mean": values.mean(), "worst10": worst.mean(), "min": values.min(),
                                     "std": values.std()})
    assert summary["min"] <= summary["worst10"] <= summary["mean"]
