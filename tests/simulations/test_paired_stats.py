"""Issue 33 item 5: the report's wins / ties / losses come from paired per-seed differences and their
95 % interval, nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.paired_stats import paired

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}
"""Student's t 0.975 quantiles for 2 and 4 degrees of freedom (published tables)."""


@pytest.mark.parametrize("seeds", [3, 5])
def test_the_interval_is_the_paired_t_interval_of_a_numpy_reference(seeds):
    rng = np.random.default_rng(seeds)
    method = {s: 0.8 + 0.02 * rng.normal() for s in range(seeds)}
    reference = {s: 0.8 + 0.02 * rng.normal() for s in range(seeds)}
    reference[99] = 0.5  # a seed only one side finished is not paired
    d = np.array([method[s] - reference[s] for s in range(seeds)])
    half = T_975[seeds - 1] * d.std(ddof=1) / math.sqrt(seeds)
    found = paired(method, reference)
    assert found.seeds == seeds
    assert (found.mean, found.low, found.high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))


@pytest.mark.parametrize("differences, verdict", [
    ([0.02, 0.03, 0.025], "wins"), ([-0.02, -0.03, -0.025], "loses"), ([0.02, -0.01, 0.03], "ties"),
    ([0.0, 0.0, 0.0], "ties"), ([0.05], "n/a"),
])
def test_the_word_follows_from_the_interval_alone(differences, verdict):
    reference = {s: 0.5 for s in range(len(differences))}
    method = {s: 0.5 + d for s, d in enumerate(differences)}
    found = paired(method, reference)
    assert found.verdict == verdict
    if verdict == "wins":
        assert found.low > 0
    if verdict == "loses":
        assert found.high < 0
    if verdict == "ties" and found.seeds >= 2:
        assert found.low <= 0 <= found.high


def test_each_variant_is_compared_with_its_methods_main_run_seed_by_seed():
    """The report's ablation table (e.g. amp's bf16 against fp32): variant minus main per seed, the same rule."""
    from simulations import report

    def runs(variant, strategy, finals):
        return [report.Run(f"{variant}-{strategy}-seed{s}", variant, strategy, s,
                           report.Curve.from_rows([{"round": 1, "accuracy": a, "bytes-down": 1, "bytes-up": 1,
                                                    "cumulative-bytes": 2}]))
                for s, a in enumerate(finals)]

    groups = {("main", "resist"): runs("main", "resist", [0.80, 0.82, 0.81]),
              ("main", "fedavg"): runs("main", "fedavg", [0.85, 0.86, 0.84]),
              ("amp", "resist"): runs("amp", "resist", [0.70, 0.71, 0.69]),
              ("amp", "fedavg"): runs("amp", "fedavg", [0.851, 0.858, 0.842]),
              ("amp", "heterofl"): runs("amp", "heterofl", [0.5, 0.5, 0.5])}  # no main run: not compared
    rows = {(r["variant"], r["strategy"]): r for r in report.ablation_rows(groups)}
    assert set(rows) == {("amp", "resist"), ("amp", "fedavg")}
    assert rows[("amp", "resist")]["mean"] == pytest.approx(-0.11) and rows[("amp", "resist")]["verdict"] == "loses"
    assert rows[("amp", "fedavg")]["verdict"] == "ties"
    text = "\n".join(report.ablation_lines(list(rows.values())))
    assert "| amp | ResIST | 3 | -0.1100 |" in text
