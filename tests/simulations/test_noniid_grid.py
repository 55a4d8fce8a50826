"""The label-skew study's one command: presets with a grid, a resumable in-process run, table and plot."""

from __future__ import annotations

import json
import math

import pytest

from simulations import compare, noniid
from simulations.presets import PresetError

TINY = ["num-server-rounds=2", "local-steps=2", "stage-depths=1,1,5,1", "base-width=4", "eval-batch-size=500",
        "grid.alphas=[0.3,iid]", "grid.norms=[batchnorm]"]


def test_the_presets_cover_the_grid_the_study_needs():
    for name, data in (("noniid-digits", "digits"), ("noniid-synthetic", "synthetic")):
        config = noniid.load_grid_preset(name)
        assert config.grid.data == data
        assert list(config.grid.alphas) == ["0.1", "0.3", "1.0", "iid"]
        assert set(config.grid.norms) == {"batchnorm", "groupnorm"}
        assert list(config.seeds) == [0, 1, 2] and set(config.strategies) == {"resist", "fedavg"}
        assert len(noniid.plan(config)) == 4 * 2 * 2 * 3


@pytest.mark.parametrize("overrides, match", [
    (["norm=groupnorm"], "grid sets"),
    (["grid.norms=[layernorm]"], "layernorm"),
    (["grid.alphas=[0.3,-1]"], "-1"),
    (["no-such-key=1"], "no-such-key"),
])
def test_bad_grids_are_refused(overrides, match):
    with pytest.raises(PresetError, match=match):
        noniid.load_grid_preset("noniid-digits", overrides)


def test_the_one_runner_runs_grids_in_process_and_refuses_what_a_grid_cannot_do(capsys):
    with pytest.raises(PresetError, match="no grid"):
        noniid.load_grid_preset("quick-cpu")
    assert compare.main(["noniid-digits", "--dry-run"]) == 0
    assert "48 cells" in capsys.readouterr().out
    for extra in (["--backend", "flwr"], ["--jobs", "2"], ["--ablations", "no-scaling"]):
        assert compare.main(["noniid-digits", "--dry-run", *extra]) == 2
        assert "is a label-skew grid" in capsys.readouterr().err


def test_mb_to_target_and_the_summary():
    runs = [{"strategy": "resist", "norm": "batchnorm", "alpha": "0.3", "seed": s, "final-accuracy": acc,
             "accuracy": curve, "mb-cumulative": [10.0, 20.0, 30.0], "mb-per-round": 10.0,
             "diverging-rounds": div, "seconds": 5.0}
            for s, acc, curve, div in ((0, 0.9, [0.5, 0.8, 0.9], []), (1, 0.5, [0.2, 0.6, 0.5], [2]))]
    assert noniid.mb_to_target(runs[0], 0.8) == 20.0
    assert noniid.mb_to_target(runs[1], 0.8) is None
    (row,) = noniid.summarize(runs, 0.8, [("resist", "batchnorm", "0.3"), ("fedavg", "batchnorm", "0.3")])
    assert row["mean"] == pytest.approx(0.7) and row["std"] == pytest.approx(math.sqrt(0.08))
    assert (row["min"], row["diverging"], row["reached"], row["mb-to-target"]) == (0.5, 1, 1, 20.0)


def test_a_tiny_grid_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["noniid-synthetic", *TINY, "--seeds", "0", "--out", str(out)]
    assert compare.main(argv) == 0
    lines = [json.loads(line) for line in (out / noniid.RESULTS_FILE).read_text().splitlines()]
    assert sorted((r["strategy"], r["alpha"]) for r in lines) == [
        ("fedavg", "0.3"), ("fedavg", "iid"), ("resist", "0.3"), ("resist", "iid")]
    assert all(len(r["accuracy"]) == 2 and 0 <= r["final-accuracy"] <= 1 for r in lines)
    resist, fedavg = (next(r for r in lines if r["strategy"] == s and r["alpha"] == "iid")
                      for s in ("resist", "fedavg"))
    assert resist["mb-per-round"] < fedavg["mb-per-round"]  # sub-networks travel, not the whole model
    report = (out / noniid.REPORT_FILE).read_text()
    assert report.count("| ResIST | batchnorm |") == 2 and report.count("| FedAvg | batchnorm |") == 2
    assert "`clip-grad-norm=1.0`" in report  # the app defaults the cells ran with are named
    assert (out / noniid.PLOT_FILE).stat().st_size > 10_000
    capsys.readouterr()
    assert compare.main(argv) == 0  # every cell is done: nothing runs again
    assert "final accuracy" not in capsys.readouterr().out
    assert len((out / noniid.RESULTS_FILE).read_text().splitlines()) == 4
    assert compare.main([*argv, "--report-only"]) == 0
    assert compare.main(["noniid-synthetic", "--report-only", "--out", str(tmp_path / "empty")]) == 1
