"""The report's per-client section from recorded client figures."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from resist_fl.run.outputs import append_metrics
from simulations.report import client_lines


def test_the_section_averages_each_runs_last_client_figures_over_seeds(tmp_path):
    finals = {0: (0.8, 0.5, 0.4, 0.1), 1: (0.9, 0.7, 0.6, 0.05)}
    for seed, (mean, worst, low, std) in finals.items():
        run_dir = tmp_path / f"main-heterofl-seed{seed}"
        run_dir.mkdir()
        early = {"round": 1, "accuracy": 0.1, "client-accuracy-mean": 0.0, "client-accuracy-worst10": 0.0,
                 "client-accuracy-min": 0.0, "client-accuracy-std": 0.0}
        last = {"round": 2, "accuracy": mean, "client-accuracy-mean": mean, "client-accuracy-worst10": worst,
                "client-accuracy-min": low, "client-accuracy-std": std}
        append_metrics(run_dir, early, last, {"round": 3, "accuracy": None})
    (tmp_path / "main-fedavg-seed0").mkdir()
    append_metrics(tmp_path / "main-fedavg-seed0", {"round": 1, "accuracy": 0.5})  # no client-eval
    groups = {("main", "heterofl"): [SimpleNamespace(name=f"main-heterofl-seed{s}") for s in finals],
              ("main", "fedavg"): [SimpleNamespace(name="main-fedavg-seed0")]}
    lines, summary = client_lines(tmp_path, groups, lambda variant, strategy: strategy)
    row = next(line for line in lines if line.startswith("| heterofl |"))
    assert row.startswith("| heterofl | 2 | 0.8500 ± 0.0707 | 0.6000 ± 0.1414 |")
    assert not any(line.startswith("| fedavg") for line in lines)
    assert summary["clients"]["heterofl"] == pytest.approx({"mean": 0.85, "worst10": 0.6, "min": 0.5,
                                                            "std": np.mean([0.1, 0.05])})
    assert client_lines(tmp_path, {("main", "fedavg"): groups[("main", "fedavg")]}, str) == ([], {})
