"""Wins, ties and losses from a stated rule: paired per-seed differences and their 95 % interval.

Every method of a comparison runs on the same seeds, and a seed fixes the data partition, the
initial model and the node sampling, so the runs pair by seed. For a method M against the reference
R, the paired differences are ``d_s = final accuracy(M, s) - final accuracy(R, s)`` over the seeds
both finished; the report gives their mean and the paired-t 95 % interval
``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (Student's t, scipy). The word is generated from it:

- **wins**: the whole interval is above 0;
- **loses**: the whole interval is below 0;
- **ties**: the interval contains 0 (the seeds cannot tell the two apart);
- **n/a**: fewer than two paired seeds (no interval).

Nothing else decides a verdict: the report's prose quotes these words, it does not make its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
"""The confidence level of the interval."""


@dataclass(frozen=True)
class Paired:
    """One method against the reference, over the seeds both finished."""

    seeds: int
    mean: float
    low: float
    high: float
    verdict: str


def paired(method: Mapping[int, float], reference: Mapping[int, float]) -> Paired:
    """The paired comparison of ``method`` against ``reference`` (seed -> final accuracy)."""
    common = sorted(set(method) & set(reference))
    differences = np.array([method[s] - reference[s] for s in common], dtype=float)
    if len(differences) < 2:
        mean = float(differences.mean()) if len(differences) else math.nan
        return Paired(len(differences), mean, math.nan, math.nan, "n/a")
    mean = float(differences.mean())
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(differences) - 1) * differences.std(ddof=1)
                 / math.sqrt(len(differences)))
    low, high = mean - half, mean + half
    verdict = "wins" if low > 0 else "loses" if high < 0 else "ties"
    return Paired(len(differences), mean, low, high, verdict)
