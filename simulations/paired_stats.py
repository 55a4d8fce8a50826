"""Wins, ties and losses from a stated rule: paired per-seed differences and their 95 % interval.

Every method of a comparison runs on the same seeds, and a seed fixes the data partition, the
initial model and the node sampling, so the runs pair by seed. For a method M against the reference
R, the paired differences are ``d_s = a(M, s) - a(R, s)`` over the seeds both finished, where ``a`` is
the report's late accuracy (the mean of a run's evaluations in its last fifth of rounds,
:mod:`simulations.report`); the report gives their mean and the paired-t 95 % interval
``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (Student's t, scipy). The word is generated from it:

- **wins**: the whole interval is above 0;
- **loses**: the whole interval is below 0;
- **ties**: the interval contains 0 (the seeds cannot tell the two apart);
- **n/a**: fewer than three paired seeds (with two, the interval is shown but gives no word: its
  t quantile is 12.7, and test accuracies are multiples of 1/n_test, so two equal differences give a
  zero-width interval that would read as a verdict).

A table compares several methods with the same reference, so some per-comparison words would be
wrong by chance alone (8 comparisons at 95 % each). Each table therefore also gives the word under
**Holm's** step-down correction over the comparisons that have a word (the family): the paired-t
p-values (two-sided, the test behind the interval) are sorted, the i-th smallest (of k) must be at
most 0.05 / (k - i + 1) for it and every smaller one to count, and a comparison that counts keeps its
sign's word (wins / loses); the others are **ties**. Holm holds the chance of any wrong win or loss
in the table at 5 % whatever the comparisons' dependence; it can only turn a win or a loss into a tie.

Nothing else decides a verdict: the report's prose quotes these words, it does not make its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
"""The confidence level of the interval."""
MIN_SEEDS = 3
"""The fewest paired seeds that give a word (module docstring)."""
LATE_FRACTION = 0.2
"""The late accuracy averages the evaluations of this last share of a run's rounds."""


def late_accuracy(rounds: Sequence[int], accuracy: Sequence[float]) -> float:
    """The mean accuracy of a run's evaluations in the last fifth of its rounds (rounds above 0.8 x the last;
    the last alone when no other falls there); ``nan`` without evaluations. Under a constant learning rate the
    global model's accuracy moves by several points between neighbouring evaluations: the rule and the
    learning-rate picks compare this mean, not one round's draw."""
    if not len(accuracy):
        return math.nan
    rounds_, accuracy_ = np.asarray(rounds, dtype=float), np.asarray(accuracy, dtype=float)
    return float(accuracy_[rounds_ > (1.0 - LATE_FRACTION) * rounds_[-1]].mean())


@dataclass(frozen=True)
class Paired:
    """One method against the reference, over the seeds both finished."""

    seeds: int
    mean: float
    low: float
    high: float
    verdict: str
    p: float = math.nan
    """Two-sided paired-t p-value of a zero mean difference (``nan`` with fewer than two seeds)."""


def paired(method: Mapping[int, float], reference: Mapping[int, float]) -> Paired:
    """The paired comparison of ``method`` against ``reference`` (seed -> accuracy)."""
    common = sorted(set(method) & set(reference))
    differences = np.array([method[s] - reference[s] for s in common], dtype=float)
    if len(differences) < 2:
        mean = float(differences.mean()) if len(differences) else math.nan
        return Paired(len(differences), mean, math.nan, math.nan, "n/a")
    mean, sd = float(differences.mean()), float(differences.std(ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(differences) - 1) * sd / math.sqrt(len(differences)))
    low, high = mean - half, mean + half
    verdict = "n/a" if len(differences) < MIN_SEEDS else "wins" if low > 0 else "loses" if high < 0 else "ties"
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(len(differences))), len(differences) - 1))
    else:  # every seed gave the same difference: certain unless that difference is 0
        p = 1.0 if mean == 0 else 0.0
    return Paired(len(differences), mean, low, high, verdict, p)


def holm(found: Sequence[Paired], level: float = LEVEL) -> list[str]:
    """The word of each comparison in ``found`` under Holm's step-down correction over those with a word
    (module docstring); ``n/a`` stays ``n/a``."""
    family = sorted((i for i, f in enumerate(found) if f.verdict != "n/a"), key=lambda i: found[i].p)
    words = ["n/a"] * len(found)
    rejecting = True
    for rank, i in enumerate(family):
        rejecting = rejecting and found[i].p <= (1 - level) / (len(family) - rank)
        words[i] = ("wins" if found[i].mean > 0 else "loses") if rejecting else "ties"
    return words
