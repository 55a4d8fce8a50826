"""Per-client accuracy of one model from its per-class test accuracy and each client's label mix.

A client's accuracy here is the model's accuracy on a test set drawn with the client's training
label distribution: ``sum_y p_c(y) * acc(y)``, where ``p_c`` is the share of label ``y`` in the
client's partition and ``acc(y)`` the model's accuracy on the test images of label ``y``. That is
the accuracy on the client's label distribution's share of the central test set (each test image
of label ``y`` weighted ``p_c(y) / n_y``), computed from one pass over the test set however many
clients there are. Labels absent from the test set get no weight (the client's mix renormalised
over the labels the test set has).

The fairness figures of the heterogeneous-FL literature summarise the clients: their mean, the
worst 10 % (the mean over the lowest-scoring ``ceil(0.1 x clients)``), the minimum and the
spread (population standard deviation across clients).
"""

from __future__ import annotations

import math

import numpy as np

WORST_FRACTION = 0.1
"""The share of clients the worst-clients figure averages over (at least one client)."""


def client_accuracies(label_counts: np.ndarray, class_correct: np.ndarray, class_count: np.ndarray) -> np.ndarray:
    """Each client's accuracy on its label distribution's share of the test set.

    Parameters
    ----------
    label_counts : (clients, classes) array
        Training images of each label in each client's partition.
    class_correct, class_count : (classes,) arrays
        Test images of each label the model classified correctly, and test images of each label.

    Returns
    -------
    (clients,) float64 array
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    correct, total = np.asarray(class_correct, dtype=np.float64), np.asarray(class_count, dtype=np.float64)
    if counts.ndim != 2 or correct.shape != total.shape or counts.shape[1] != total.shape[0]:
        raise ValueError(f"label counts {counts.shape}, class correct {correct.shape}, class count {total.shape}: "
                         "expected (clients, classes), (classes,), (classes,)")
    if (counts < 0).any() or (total < 0).any() or (correct > total).any() or (correct < 0).any():
        raise ValueError("counts must be non-negative and correct <= count per class")
    tested = total > 0
    weights = counts[:, tested]
    mass = weights.sum(axis=1)
    if (mass <= 0).any():
        empty = np.flatnonzero(mass <= 0).tolist()
        raise ValueError(f"clients {empty} hold no image of a label the test set has")
    per_class = correct[tested] / total[tested]
    return weights @ per_class / mass


def fairness_summary(accuracies: np.ndarray) -> dict[str, float]:
    """``mean``, ``worst10`` (mean of the lowest-scoring 10 %, at least one client), ``min``, ``std``."""
    values = np.sort(np.asarray(accuracies, dtype=np.float64))
    if values.size == 0:
        raise ValueError("no client accuracies to summarise")
    worst = max(1, math.ceil(WORST_FRACTION * values.size))
    return {"mean": float(values.mean()), "worst10": float(values[:worst].mean()), "min": float(values[0]),
            "std": float(values.std())}
