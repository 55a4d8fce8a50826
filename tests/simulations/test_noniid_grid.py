"""The label-skew grids go through the one runner: each cell is a variant with run directories, reported
like any comparison, and the docs' tables are read from those directories."""

from __future__ import annotations

import pytest

from simulations import compare, figures, noniid_figures, report
from simulations.presets import PresetError, load_preset, validate_preset

TINY = ["num-server-rounds=2", "local-steps=2", "stage-depths=1,1,5,1", "base-width=4", "eval-batch-size=500",
        "grid.alphas=[0.3,iid]", "grid.norms=[batchnorm]"]


def plan_of(*argv: str) -> list[compare.PlannedRun]:
    return compare.resolve(compare.parse_args(list(argv)))[1]


def test_the_presets_cover_the_grid_the_study_needs():
    for name, dataset in (("noniid-digits", "digits"), ("noniid-synthetic", "synthetic")):
        plan = plan_of(name)
        assert len(plan) == 4 * 2 * 2 * 3 and {r.run_config["dataset"] for r in plan} == {dataset}
        assert {(r.variant, r.strategy, r.seed) for r in plan} == {
            (f"{n}-{a}", s, seed) for a in ("0.1", "0.3", "1.0", "iid") for n in ("batchnorm", "groupnorm")
            for s in ("resist", "fedavg") for seed in (0, 1, 2)}
        cell = next(r.run_config for r in plan if r.variant == "groupnorm-0.1")
        assert (cell["norm"], cell["partitioner"], cell["dirichlet-alpha"]) == ("groupnorm", "dirichlet", 0.1)
        assert next(r.run_config for r in plan if r.variant == "batchnorm-iid")["partitioner"] == "iid"


def test_a_grids_ablations_change_its_first_cell():
    plan = plan_of("noniid-digits-l50")
    cells = {r.variant for r in plan if r.variant.endswith("-0.3")}
    assert cells == {"batchnorm-0.3", "groupnorm-0.3"}
    remedies = [r for r in plan if r.variant not in cells]
    assert {(r.variant, r.strategy) for r in remedies if r.seed == 0} == {
        ("clip-1.0", "resist"), ("clip-1.0", "fedavg"), ("lr-0.02", "resist"), ("server-lr-0.5", "resist")}
    first = next(r.run_config for r in plan if r.name == "batchnorm-0.3-resist-seed0")
    clipped = next(r.run_config for r in plan if r.name == "clip-1.0-resist-seed0")
    assert first["clip-grad-norm"] == 0.0 and first["local-steps"] == 50
    assert {k for k in clipped if clipped[k] != first[k]} == {"clip-grad-norm", "run-name"}
    replay = plan_of("noniid-digits-l50-replay")
    assert sorted(r.name for r in replay) == ["batchnorm-0.3-resist-seed1", "clip-1.0-fedavg-seed1",
                                              "clip-1.0-resist-seed1"]
    assert {r.run_config["num-server-rounds"] for r in replay} == {6}


@pytest.mark.parametrize("overrides, match", [
    (["norm=groupnorm"], "grid sets"),
    (["grid.norms=[layernorm]"], "layernorm"),
    (["grid.alphas=[0.3,-1]"], "-1"),
    (["grid.alphas=[nan]"], "nan"),
    (["grid.alphas=[1,'1.0']"], "a cell twice"),
    (["grid.alphas=[]"], "non-empty lists"),
    (["grid.alphas=0.3"], "non-empty lists"),
    (["grid.data=digits"], "non-empty lists alphas and norms and nothing else"),
    (["strategy-config.fedavg.norm=groupnorm"], "strategy-config.fedavg sets"),
    (["tuning={lr: [0.1], seed: 100, num-server-rounds: 2}"], "no learning-rate tuning"),
    (["no-such-key=1"], "no-such-key"),
])
def test_bad_grids_are_refused(overrides, match):
    with pytest.raises(PresetError, match=match):
        plan_of("noniid-digits", *overrides)


def test_a_bad_grid_is_refused_before_anything_runs(tmp_path, capsys):
    assert compare.main(["noniid-digits", "grid.norms=[layernorm]", "--out", str(tmp_path / "x")]) == 2
    assert "layernorm" in capsys.readouterr().err and not (tmp_path / "x").exists()
    validate_preset(load_preset("quick-cpu"), compare.PROJECT_DIR)  # no grid: nothing to check


def test_a_tiny_grid_runs_resumes_reports_and_gives_the_docs_tables(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results" / "tiny-grid"
    argv = ["noniid-synthetic", *TINY, "--seeds", "0", "--out", str(out), "--ablations", "transport-dtype=uint8"]
    assert compare.main(argv) == 0
    names = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name != "logs")
    assert names == ["batchnorm-0.3-fedavg-seed0", "batchnorm-0.3-resist-seed0", "batchnorm-iid-fedavg-seed0",
                     "batchnorm-iid-resist-seed0", "transport-dtype_uint8-fedavg-seed0",
                     "transport-dtype_uint8-resist-seed0"]
    text = (out / report.REPORT_FILE).read_text()
    assert "ResIST (batchnorm-0.3)" in text and "FedAvg (batchnorm-iid)" in text
    assert "A grid: each variant `<norm>-<alpha>`" in text
    capsys.readouterr()
    assert compare.main(argv) == 0  # every cell is done: nothing runs again
    assert "[start" not in capsys.readouterr().out

    monkeypatch.setattr(noniid_figures, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(noniid_figures, "ROOT", tmp_path)
    _, _, lines = noniid_figures.grid_lines("tiny-grid")
    assert {(line["strategy"], line["norm"], line["alpha"]) for line in lines} == {
        (s, "batchnorm", a) for s in ("resist", "fedavg") for a in ("0.3", "iid")}
    block = noniid_figures.grid_block("tiny-grid")
    assert block[0].startswith("From the runs in `results/tiny-grid/` (4 runs, 1 seeds per cell")
    resist = next(line for line in lines if line["name"] == "batchnorm-iid-resist-seed0")
    assert f"| iid | {resist['final-accuracy']:.3f} ± 0.000 |" in "\n".join(block)
    assert "per cell): no cell with two paired seeds." in block[-1]  # one seed: no word
    table = noniid_figures.seeds_table("tiny-grid", lambda line: f"{line['strategy']} {line['alpha']}", "cell",
                                       noniid_figures.cells_only)
    assert [row.split(" | ")[0] for row in table[4:]] == ["| resist 0.3", "| fedavg 0.3", "| resist iid",
                                                          "| fedavg iid"]
    assert all(row.endswith("| 0/1 | 1.0 | 0.05 |") for row in table[4:])  # none diverged; the clip norm and lr
    curves = noniid_figures.curves_table("tiny-grid")
    assert len(curves) == 2 + 2 + 6 and all(row.count(" / ") == 1 for row in curves[4:])  # 2 rounds of loss each
    monkeypatch.setattr(figures, "RESULTS", tmp_path / "results")
    transport = figures.report_section("tiny-grid", "Results", ("variant", "strategy", "MB / round"))
    assert transport[2:4] == ["| variant | strategy | MB / round |", "|---|---|---|"]
    mb = {tuple(c.strip() for c in row.strip("|").split("|")[:2]): float(row.rsplit("|", 2)[1])
          for row in transport[4:]}
    assert mb["transport-dtype=uint8", "ResIST"] < mb["batchnorm-0.3", "ResIST"] / 3  # a byte per element, not four
    with pytest.raises(ValueError, match="'accuracy' is not in list"):
        figures.report_section("tiny-grid", "Results", ("accuracy",))
    with pytest.raises(KeyError, match="no section '## Nope'"):
        figures.report_section("tiny-grid", "Nope")
    remedies = noniid_figures.remedies_table("tiny-grid", "change")
    changes = [row.split(" | ")[0] for row in remedies[4:]]
    assert changes[0] == "| none (the first cell)" and changes[-1] == "| `transport-dtype=uint8`"
    assert "`partitioner=iid`" in changes[1]  # the other cell, against the first


def test_a_change_is_read_from_the_run_configs(tmp_path):
    lines = [{"variant": "batchnorm-0.3", "cell": True, "strategy": "resist", "seed": 0,
              "config": {"lr": 0.05, "clip-grad-norm": 0.0, "run-name": "a"}},
             {"variant": "lr-0.02", "cell": False, "strategy": "resist", "seed": 0,
              "config": {"lr": 0.02, "clip-grad-norm": 0.0, "run-name": "b"}}]
    key = noniid_figures.change(lines)
    assert [key(line) for line in lines] == ["none (the first cell)", "`lr=0.02`"]


def test_a_missing_comparison_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(noniid_figures, "RESULTS", tmp_path)
    with pytest.raises(FileNotFoundError, match="no committed comparison named 'nope'"):
        noniid_figures.grid_lines("nope")



def test_a_grids_ablations_are_paired_with_its_first_cell_and_its_cells_are_not():
    def run(variant: str, seed: int, accuracy: float) -> report.Run:
        rows = [{"round": 1, "accuracy": accuracy, "bytes-down": 1, "bytes-up": 1, "cumulative-bytes": 2}]
        return report.Run(f"{variant}-resist-seed{seed}", variant, "resist", seed, report.Curve.from_rows(rows))

    groups = report.group_runs([run(v, seed, acc + 0.01 * seed) for seed in (0, 1, 2)
                                for v, acc in (("batchnorm-0.3", 0.8), ("groupnorm-0.3", 0.7), ("clip-1.0", 0.9))])
    rows = report.ablation_rows(groups, ["batchnorm-0.3", "groupnorm-0.3"])
    assert [(r["variant"], r["seeds"], round(r["mean"], 6), r["verdict"]) for r in rows] == [
        ("clip-1.0", 3, 0.1, "wins")]
    assert report.ablation_lines(rows, "batchnorm-0.3")[0] == \
        "## Each ablation against the grid's first cell (batchnorm-0.3) of its method"
    assert report.ablation_rows(groups) == []  # no main variant, no grid: nothing to pair with
