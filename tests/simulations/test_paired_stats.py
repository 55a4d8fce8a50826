"""Issue 33 item 5: the report's wins / ties / losses come from paired per-seed differences and their
95 % interval, nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.paired_stats import Paired, holm, paired

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
    ([-0.009, -0.009], "n/a"),  # two equal differences: a zero-width interval, still no word
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
    if verdict == "ties":
        assert found.low <= 0 <= found.high
    if found.seeds == 2:  # the interval is still given
        assert found.low == found.high == pytest.approx(differences[0])


@pytest.mark.parametrize("seeds", [3, 4, 5])
def test_the_p_value_is_scipys_paired_t_test(seeds):
    from scipy import stats

    rng = np.random.default_rng(10 + seeds)
    method = {s: 0.8 + 0.02 * rng.normal() for s in range(seeds)}
    reference = {s: 0.79 + 0.02 * rng.normal() for s in range(seeds)}
    found = paired(method, reference)
    expected = stats.ttest_rel([method[s] for s in range(seeds)], [reference[s] for s in range(seeds)]).pvalue
    assert found.p == pytest.approx(expected, rel=1e-9)
    assert (found.p < 0.05) == (found.verdict in ("wins", "loses"))  # the interval and the test agree


def _comparison(mean: float, p: float, verdict: str | None = None) -> Paired:
    word = verdict or ("ties" if p > 0.05 else "wins" if mean > 0 else "loses")
    return Paired(5, mean, math.nan, math.nan, word, p)


def test_holm_steps_down_through_the_sorted_p_values_of_the_comparisons_with_a_word():
    # k = 4 with a word: thresholds 0.05/4, 0.05/3, 0.05/2, 0.05 on the sorted p-values 0.01, 0.02, 0.03, 0.04.
    # 0.01 <= 0.0125 counts; 0.02 > 0.0167 stops the descent, so 0.03 and 0.04 (each below 0.05) are ties too.
    found = [_comparison(+0.02, 0.03), _comparison(-0.05, 0.01), _comparison(-0.01, 0.04), _comparison(0.03, 0.02),
             _comparison(0.01, 0.001, "n/a")]  # too few seeds: outside the family, whatever its p
    assert holm(found) == ["ties", "loses", "ties", "ties", "n/a"]
    # the same p-values with a larger budget of evidence: 0.004, 0.006 pass 0.0125, 0.0167; 0.03 > 0.025 stops
    found = [_comparison(+0.02, 0.006), _comparison(-0.05, 0.004), _comparison(-0.01, 0.03), _comparison(0.03, 0.04)]
    assert holm(found) == ["wins", "loses", "ties", "ties"]
    assert holm([_comparison(-0.02, 0.049)]) == ["loses"]  # one comparison: no correction
    assert holm([]) == []


def test_holm_never_turns_a_tie_into_a_win_or_a_loss():
    rng = np.random.default_rng(3)
    for _ in range(200):
        found = [_comparison(float(m), float(p)) for m, p in zip(rng.normal(size=6), rng.uniform(0, 0.2, 6))]
        for comparison, word in zip(found, holm(found)):
            assert word == comparison.verdict or word == "ties"


def _runs(variant, strategy, finals):
    """One run per seed of a group, each with a single evaluation (its final and late accuracy)."""
    from simulations import report

    return [report.Run(f"{variant}-{strategy}-seed{s}", variant, strategy, s,
                       report.Curve.from_rows([{"round": 1, "accuracy": a, "bytes-down": 1, "bytes-up": 1,
                                                "cumulative-bytes": 2}]))
            for s, a in enumerate(finals)]


def test_each_variant_is_compared_with_its_methods_main_run_seed_by_seed():
    """The report's ablation table (e.g. amp's bf16 against fp32): variant minus main per seed, the same rule."""
    from simulations import report

    groups = {("main", "resist"): _runs("main", "resist", [0.80, 0.82, 0.81]),
              ("main", "fedavg"): _runs("main", "fedavg", [0.85, 0.86, 0.84]),
              ("amp", "resist"): _runs("amp", "resist", [0.70, 0.71, 0.69]),
              ("amp", "fedavg"): _runs("amp", "fedavg", [0.851, 0.858, 0.842]),
              ("amp", "heterofl"): _runs("amp", "heterofl", [0.5, 0.5, 0.5])}  # no main run: not compared
    rows = {(r["variant"], r["strategy"]): r for r in report.ablation_rows(groups)}
    assert set(rows) == {("amp", "resist"), ("amp", "fedavg")}
    assert rows[("amp", "resist")]["mean"] == pytest.approx(-0.11) and rows[("amp", "resist")]["verdict"] == "loses"
    assert rows[("amp", "fedavg")]["verdict"] == "ties"
    text = "\n".join(report.ablation_lines(list(rows.values())))
    assert "| amp | ResIST | 3 | -0.1100 |" in text


def test_a_variant_without_resist_is_paired_with_the_main_comparisons_resist():
    """An ablation of one method (DepthFL with FedDyn) has no ResIST of its own: its paired row is against the main
    comparison's ResIST on the same seeds (a grid: its first cell's), and the report says so."""
    from simulations import report

    groups = {("main", "resist"): _runs("main", "resist", [0.80, 0.82, 0.81]),
              ("main", "depthfl"): _runs("main", "depthfl", [0.75, 0.76, 0.77]),
              ("amp", "resist"): _runs("amp", "resist", [0.60, 0.60, 0.60]),
              ("amp", "fedavg"): _runs("amp", "fedavg", [0.70, 0.71, 0.69]),
              ("feddyn", "depthfl"): _runs("feddyn", "depthfl", [0.83, 0.86, 0.84])}
    rows = {(r["variant"], r["strategy"]): r for r in report.paired_rows(groups)}
    assert rows[("feddyn", "depthfl")]["mean"] == pytest.approx(0.0333, abs=1e-4)  # minus main's ResIST
    assert rows[("amp", "fedavg")]["mean"] == pytest.approx(0.10)  # its own variant's ResIST when it ran one
    cells = {("bn-iid", "resist"): groups[("main", "resist")], ("bn-iid", "depthfl"): groups[("main", "depthfl")],
             ("feddyn", "depthfl"): groups[("feddyn", "depthfl")]}
    (grid_row,) = [r for r in report.paired_rows(cells, "bn-iid") if r["variant"] == "feddyn"]
    assert grid_row["mean"] == pytest.approx(0.0333, abs=1e-4)
    stats = [report.group_stats(v, s, g, None) for (v, s), g in groups.items()]
    text = "\n".join(report.paired_lines(list(rows.values()), ["feddyn"]))
    assert "the variant feddyn did not run ResIST: against ResIST of the main comparison" in text
    assert "did not run ResIST" not in "\n".join(report.paired_lines(list(rows.values())))
    rendered = report.render({"preset": "x"}, stats, [], None, "none", [], paired_table=list(rows.values()))
    assert "the variant feddyn did not run ResIST" in rendered


def test_the_rule_compares_the_late_accuracy_not_the_last_rounds_draw():
    """Under a constant learning rate the last evaluation is one draw of a noisy curve: the rule compares the mean
    of the evaluations in the last fifth of the rounds (rounds 68-80 of 80 here), and the report shows both."""
    from simulations import report

    def curve(late_values, last):
        rounds = list(range(4, 81, 4))
        accuracy = [0.3] * (len(rounds) - 4) + [*late_values, last]  # round 64 and before: 0.3
        return report.Curve.from_rows([{"round": r, "accuracy": a, "bytes-down": 1, "bytes-up": 1,
                                        "cumulative-bytes": 2 * r} for r, a in zip(rounds, accuracy)])

    steady = curve([0.80, 0.81, 0.79], 0.80)
    assert steady.late_accuracy == pytest.approx(0.80) and steady.final_accuracy == 0.80
    lucky = curve([0.70, 0.71, 0.69], 0.86)  # a worse run whose last evaluation happens to be high
    assert lucky.late_accuracy == pytest.approx(0.74)
    groups = {("main", "resist"): [report.Run(f"main-resist-seed{s}", "main", "resist", s, steady) for s in range(3)],
              ("main", "fedavg"): [report.Run(f"main-fedavg-seed{s}", "main", "fedavg", s, lucky) for s in range(3)]}
    (row,) = report.paired_rows(groups)
    assert row["mean"] == pytest.approx(-0.06) and row["verdict"] == "loses"  # by the final round it would "win"
    assert report.Curve.from_rows([{"round": 1, "accuracy": 0.5, "bytes-down": 1, "bytes-up": 1,
                                    "cumulative-bytes": 2}]).late_accuracy == 0.5  # one evaluation: that one
