"""The figures quoted in the README and docs are regenerated from the committed raw results."""

from __future__ import annotations

import json
import math
import re

import pytest

from simulations import figures


def test_every_quoted_figure_matches_its_committed_source():
    assert figures.main(["--check"]) == 0


def test_a_figure_typed_by_hand_is_caught(tmp_path, capsys):
    text = (figures.ROOT / "docs" / "heterogeneous.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- figures: hetero-baselines -->\n.*?\| (\d\.\d{4}) ±", text, re.S)
    assert block, "the docs quote the hetero-baselines table"
    edited = text.replace(block.group(1), "0.9999", 1)
    copy = tmp_path / "heterogeneous.md"
    copy.write_text(edited, encoding="utf-8")
    assert figures.main(["--check", str(copy)]) == 1
    assert "stale figures" in capsys.readouterr().err
    assert figures.main(["--write", str(copy)]) == 0 and copy.read_text(encoding="utf-8") == text


def test_an_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="figures block 'nope'"):
        figures.render("<!-- figures: nope -->\n<!-- end of figures: nope -->")


def test_the_baselines_block_is_computed_from_the_runs_not_copied():
    lines = figures.baselines_block("hetero-baselines")
    rows = [line for line in lines if line.startswith("| ") and "final accuracy" not in line]
    assert len(rows) == 7  # every method
    assert "smallest sub-network costs" in lines[0]


def _runs(variant, strategy, finals):
    from simulations import report

    return [report.Run(f"{variant}-{strategy}-seed{s}", variant, strategy, s,
                       report.Curve.from_rows([{"round": 1, "accuracy": a, "bytes-down": 1, "bytes-up": 1,
                                                "cumulative-bytes": 2}]))
            for s, a in enumerate(finals)]


def _verdicts(monkeypatch, groups, budgets, planned=(3, 3)):
    """verdicts_block over made-up runs: ``budgets`` maps a strategy to its budget used per capacity."""
    from types import SimpleNamespace

    monkeypatch.setattr(figures, "_groups", lambda name: (figures.RESULTS / name, {}, groups))
    monkeypatch.setattr(figures, "load_preset", lambda name: SimpleNamespace(strategies=[0] * planned[0],
                                                                              seeds=[0] * planned[1]))
    monkeypatch.setattr(figures, "node_summary", lambda dirs: {"budget-by-capacity": budgets[dirs[0].name.split(
        "-")[1]]})
    return figures.verdicts_block("made-up")


def test_the_verdicts_block_words_are_holms_with_each_methods_interval_seeds_and_budget_overruns(monkeypatch):
    groups = {("main", "resist"): _runs("main", "resist", [0.80, 0.82, 0.81, 0.83]),
              ("main", "fedavg"): _runs("main", "fedavg", [0.85, 0.87, 0.86, 0.88]),  # +0.05 every seed: p = 0
              ("main", "heterofl"): _runs("main", "heterofl", [0.77, 0.815, 0.79, 0.805]),  # -0.02, p ~ 0.034
              ("main", "depthfl"): _runs("main", "depthfl", [0.81, 0.81, 0.83, 0.81]),  # +/- 0.01-0.02: a tie
              ("main", "fjord"): _runs("main", "fjord", [0.81, 0.80]),  # two seeds: no word
              ("amp", "resist"): _runs("amp", "resist", [0.1, 0.1, 0.1])}  # an ablation: not in the answer
    budgets = {"resist": {1.0: 0.4, 0.5: 1.5}, "fedavg": {1.0: 1.0, 0.5: 2.0}, "heterofl": {1.0: 1.0, 0.5: 0.78},
               "depthfl": {1.0: 1.0, 0.5: 0.5}, "fjord": {1.0: 1.0, 0.5: 0.9}}
    lines = _verdicts(monkeypatch, groups, budgets)
    from simulations import report

    rows = {r["strategy"]: r for r in report.paired_rows({k: v for k, v in groups.items() if k[0] == "main"})}
    # Holm over 3: p = 0 passes 0.05/3; HeteroFL's ~0.034 fails 0.05/2 though it is below 0.05 alone
    assert rows["heterofl"]["verdict"] == "loses" and rows["heterofl"]["holm"] == "ties"
    assert 0.025 < rows["heterofl"]["p"] < 0.05 and rows["fedavg"]["holm"] == "wins"
    assert lines[0].startswith("All 9 main runs finished")  # 17 runs here, more than the made-up plan's 9
    assert "the table's 3 comparisons together" in lines[0]  # FjORD's two seeds give no word: not in the family
    assert lines[2] == "- ResIST, the reference, used 1: 0.40x, 0.5: 1.50x of its budget."
    by_word = {line.split("**")[1]: line for line in lines if line.startswith("- **")}
    assert by_word["beat ResIST"] == ("- **beat ResIST**: FedAvg (+0.0500 [+0.0500, +0.0500], n = 4; over budget at "
                                      "0.5: 2.00x)")
    heterofl = rows["heterofl"]
    assert by_word["tie with ResIST"].startswith("- **tie with ResIST**: DepthFL (+0.0000 [")  # by mean, high first
    assert by_word["tie with ResIST"].endswith(f"; HeteroFL ({heterofl['mean']:+.4f} [{heterofl['low']:+.4f}, "
                                               f"{heterofl['high']:+.4f}], n = 4; loses without the correction)")
    assert by_word["lose to ResIST"] == "- **lose to ResIST**: none"
    assert by_word["no word yet (fewer than 3 seeds paired with ResIST's)"].startswith("- **no word yet (fewer than "
                                                                                    "3 seeds paired with ResIST's)**: "
                                                                                    "FjORD (-0.0050 [")
    assert not any("amp" in line or "0.1000" in line for line in lines)


def test_the_verdicts_block_says_when_the_study_is_interim_or_has_no_pairs(monkeypatch):
    groups = {("main", "resist"): _runs("main", "resist", [0.80, 0.82, 0.81]),
              ("main", "fedavg"): _runs("main", "fedavg", [0.85])}
    lines = _verdicts(monkeypatch, groups, {"resist": {1.0: 0.4}, "fedavg": {1.0: 1.0}}, planned=(2, 3))
    assert lines[0].startswith("**Interim: 4 of the 6 planned main runs have finished**")
    assert lines[-1] == "- No method has two seeds paired with ResIST's yet: no words."
    no_resist = _verdicts(monkeypatch, {("main", "fedavg"): _runs("main", "fedavg", [0.85, 0.86, 0.87])},
                          {"fedavg": {1.0: 1.0}}, planned=(2, 3))
    assert "used - of its budget" in no_resist[2] and no_resist[-1].startswith("- No method has two seeds")


def test_the_committed_studys_verdicts_block_matches_its_report():
    """On the committed runs: every method appears once, under its Holm word, with the report's numbers."""
    from simulations import report

    lines = figures.verdicts_block("fmnist-study")
    _, _, groups = figures._main_groups("fmnist-study")
    text = "\n".join(lines)
    for row in report.paired_rows(groups):
        label = report.group_label(report.MAIN_VARIANT, row["strategy"])
        entry = f"{label} ({row['mean']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}], n = {row['seeds']}"
        assert text.count(entry) == 1
        assert entry in next(line for line in lines if line.startswith(f"- **{figures.WORDS[row['holm']]}**"))


def test_the_verdicts_block_says_when_resist_itself_is_still_rising():
    """ResIST within budget on ResNet-18 trains a fifth of the nodes and fails the plateau rule; the study does not."""
    held = figures.verdicts_block("fmnist-study-resnet18-within-budget")[2]
    assert held.startswith("- ResIST, the reference, used 1: ") and held.endswith("; still rising at round 80.")
    assert figures.verdicts_block("fmnist-study")[2].endswith("of its budget.")


def test_a_report_section_block_is_that_section_of_the_committed_report():
    from simulations import report

    lines = figures.report_section("fmnist-study", "Each variant against the main run of its method")
    committed = (figures.RESULTS / "fmnist-study" / report.REPORT_FILE).read_text()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) >= 3 and "\n".join(table) in committed  # the same rows, words and Holm column, in order
    assert "Holm over" in table[0] and sum("| amp |" in line for line in table) == 2
    cut = figures.report_section("fmnist-study", "Results", ("strategy", "late accuracy"))
    assert cut[2:4] == ["| strategy | late accuracy |", "|---|---|"] and all(row.count("|") == 3 for row in cut[2:])
    amp = figures.report_section("fmnist-study", "Paired comparison with ResIST", rows=("amp",))
    assert amp[2].startswith("| variant | method |") and len(amp) == 5 and amp[4].startswith("| amp | FedAvg | 5 |")
    assert amp[4] in committed
    with pytest.raises(KeyError, match="no row nope"):
        figures.report_section("fmnist-study", "Paired comparison with ResIST", rows=("nope",))


# A measured-looking number: an accuracy or ratio with 3+ decimals, a size, a rate, a time, a percentage
# or a speed-up, outside a figures block, a code block and inline code.
MEASURED = re.compile(r"(?<![\w.=/-])(\d\.\d{3,}|\d[\d,]*(\.\d+)? ?(MB|MiB|GB|GiB|images/s|ms)\b|\d+\.\d+ ?(s|%)(?!\w)"
                      r"|\d+(\.\d+)?x(?!\w))")
NOT_MEASURED = (  # settings, design constants, targets and quotes of others' figures: not this project's measurements
    "~6 GB", "38 MB for a", "every 0.2 s", "= 4x of the round", "more than 4x the median", "every 5 ms",
    "(3.58x-3.81x on 4 and 8 GPUs)", "the last one 3x slower", "one node 3x slower", "bf16 at least 2.5x fp32",
    "its figures: 0.189 where FedAvg reached", "0.969). That exact cell", "above 5x, and 0.5 nats",
    "was above 5x the best earlier round's",
)


def _outside_blocks(text: str) -> str:
    keep_lines = lambda m: "\n" * m.group(0).count("\n")  # noqa: E731
    text = figures.BLOCK.sub(keep_lines, text)
    return re.sub(r"```.*?```", keep_lines, text, flags=re.S)


def test_no_measured_figure_is_typed_outside_a_figures_block():
    pages = [figures.ROOT / "README.md", *sorted((figures.ROOT / "docs").rglob("*.md"))]
    typed = []
    for page in pages:
        if page.name == "report.md" and "results" in page.relative_to(figures.ROOT).parts:
            continue  # a comparison's own report, written with its runs by simulations.report
        for number, line in enumerate(_outside_blocks(page.read_text(encoding="utf-8")).splitlines(), 1):
            if MEASURED.search(re.sub(r"`[^`]*`", "", line)) and not any(ok in line for ok in NOT_MEASURED):
                typed.append(f"{page.relative_to(figures.ROOT)}:{number}: {line.strip()}")
    assert typed == [], "figures typed by hand (put them in a figures block written from a committed file):\n" + \
        "\n".join(typed)


def test_the_results_index_lists_every_committed_results_folder():
    results = figures.ROOT / "docs" / "results"
    index = (results / "README.md").read_text(encoding="utf-8")
    folders = sorted(p.name for p in results.iterdir() if p.is_dir())
    assert [f for f in folders if f"[{f}](" not in index and f"]({f}/" not in index] == []


def test_a_benchmark_output_whose_ratio_was_edited_is_refused(tmp_path):
    from simulations import benchmark_figures

    committed = benchmark_figures.PERFORMANCE / "loader_benchmark.json"
    assert "images/s" in benchmark_figures.loader_row(committed)
    edited = json.loads(committed.read_text(encoding="utf-8")) | {"ratio": 99.0}
    (tmp_path / "loader_benchmark.json").write_text(json.dumps(edited), encoding="utf-8")
    with pytest.raises(ValueError, match="loader_benchmark: the quoted figure 99.0 disagrees"):
        benchmark_figures.loader_row(tmp_path / "loader_benchmark.json")


def test_the_summary_quotes_the_ratio_recomputed_from_the_raw_figures():
    from simulations import benchmark_figures

    committed = benchmark_figures.PERFORMANCE / "round_time_benchmark.json"
    raw = json.loads(committed.read_text())
    medians = {s: sorted(v[1:])[len(v[1:]) // 2] for s, v in raw["seconds"].items()}  # 3 later rounds: the middle
    figure = benchmark_figures.round_time_row(committed)
    assert f"**{medians['resist'] / medians['fedavg']:.3f}**" in figure


COMPARISONS = sorted(p.parent.name for p in (figures.RESULTS).glob("*/compare.json"))


@pytest.mark.parametrize("name", COMPARISONS)
def test_a_committed_comparison_report_is_what_its_runs_give(name, tmp_path):
    """report.md of every committed comparison is rebuilt, byte for byte, from its run directories."""
    import shutil

    from simulations import report

    copy = tmp_path / name
    shutil.copytree(figures.RESULTS / name, copy, ignore=shutil.ignore_patterns("report.*", "logs", "*.pt"))
    committed = (figures.RESULTS / name / report.REPORT_FILE).read_text(encoding="utf-8")
    assert report.build_report(copy).read_text(encoding="utf-8") == committed


@pytest.mark.parametrize("name", COMPARISONS)
def test_a_committed_comparison_holds_no_machine_local_path(name):
    text = (figures.RESULTS / name / "compare.json").read_text(encoding="utf-8")
    assert not re.findall(r'"(?:/tmp|/work|/home|/root)[^"]*', text)
    assert not re.findall(r'[^" ]+/bin/flwr', text)


MADE_WITH_THE_FORMER_DIGITS_FILE = {"hetero-baselines", "privacy-digits"}
"""Made from a digits .npz the runner wrote, before ``dataset='digits'`` replaced it: their command now
reruns them (the runner refuses the directory) instead of reusing them."""


@pytest.mark.parametrize("name", COMPARISONS)
def test_a_committed_comparisons_runs_are_what_its_command_plans_today(name):
    """Its command, run on these runs, would reuse every one: a changed default (``width-rates`` became
    ``layers``) or preset shows here, not as a silent mismatch between the report and the code."""
    import shlex

    from simulations import compare
    from simulations.tuning import picks, tuning_results

    manifest = json.loads((figures.RESULTS / name / "compare.json").read_text(encoding="utf-8"))
    command = re.sub(r"<a git worktree of commit \w+>", str(figures.ROOT), manifest["command"])
    command = command.replace("<this directory>", "out")
    _, plan, _ = compare.resolve(compare.parse_args(shlex.split(command)[3:]))
    if any(compare.is_tuning(run.variant) for run in plan):  # the rates the runner picks from the grid's runs
        plan = compare.with_picked_rates(plan, picks(tuning_results(manifest["runs"], figures.RESULTS / name)))
    defaults = compare.app_config_keys(figures.ROOT)
    changed = {}
    for run in plan:
        saved = figures.RESULTS / name / run.name / "run_config.json"
        if saved.exists():
            found = compare.differences(run, json.loads(saved.read_text())["run_config"], defaults)
            changed.update({f"{run.name}: {k}": v for k, v in found.items()})
    assert bool(changed) == (name in MADE_WITH_THE_FORMER_DIGITS_FILE), changed


def test_differences_compare_the_keys_a_method_reads_at_todays_defaults():
    from simulations.compare import PlannedRun, differences

    run = PlannedRun("main-heterofl-seed0", "main", "heterofl", 0, {"lr": 0.1, "output-dir": "/a"})
    defaults = {"lr": 0.05, "width-rates": "layers", "allocation": "uniform", "validation-size": 0}
    assert differences(run, {"lr": 0.1, "output-dir": "/b", "width-rates": "layers"}, defaults) == {}
    assert differences(run, {"lr": 0.1, "width-rates": "channels"}, defaults) == {
        "width-rates": ("channels", "layers")}  # a default changed since the run
    assert differences(run, {"lr": 0.1, "allocation": "capacity"}, defaults) == {}  # only ResIST reads it
    assert differences(run, {"lr": 0.2, "validation-size": 5000}, defaults) == {
        "lr": (0.2, 0.1), "validation-size": (5000, 0)}
    assert differences(run, {}, defaults) == {"lr": (None, 0.1)}  # a planned key the run lacks


def test_portable_makes_paths_relative_to_the_output_directory(tmp_path):
    import sys
    from pathlib import Path

    from simulations.compare import portable

    flwr = str(Path(sys.executable).with_name("flwr"))
    entry = {"log": f"{tmp_path}/logs/a.log", "command": f"{flwr} run . --run-config {tmp_path}/logs/a.toml",
             "run-config": {"output-dir": str(tmp_path), "data-path": f"{tmp_path}/digits.npz", "lr": 0.1}}
    assert portable(entry, tmp_path) == {"log": "logs/a.log", "command": "flwr run . --run-config logs/a.toml",
                                         "run-config": {"output-dir": ".", "data-path": "digits.npz", "lr": 0.1}}
    inprocess = f"{sys.executable} -m simulations.inprocess {tmp_path}/logs/a.run-config.toml 100"
    assert portable(inprocess, tmp_path) == "python -m simulations.inprocess logs/a.run-config.toml 100"


def test_the_floors_block_marks_over_exactly_where_resists_floor_exceeds_the_budget():
    """Against the cost model built here from the committed study's recorded model."""
    from resist_fl.core.decomposition import BlockLayout
    from resist_fl.core.model_cost import CostModel

    lines = figures.floors_block("fmnist-study", (40, 72))
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| 1-1-")]
    assert [r[0].strip() for r in rows] == ["1-1-17-1 (the study's)", "1-1-40-1", "1-1-72-1"]
    recorded = json.loads((figures.RESULTS / "fmnist-study" / "main-resist-seed0" / "run_config.json").read_text())
    spec, stages, image = figures._model_of(recorded)
    for row in rows:
        depths = tuple(int(d) for d in row[0].split()[0].split("-"))
        costs = CostModel(figures.replace(spec, depths=depths), BlockLayout.from_spec(
            figures.replace(spec, depths=depths), stages), image)
        assert row[1].strip() == f"{100 * costs.floor_fraction():.1f} %"
        for capacity, cell in zip((1, 0.5, 0.25, 0.125, 0.0625), row[3:]):
            fits = costs.floor_fraction() <= capacity * (1 + 1e-9)
            assert cell.strip() == (str(costs.max_depth(capacity, "flops")) if fits else "over")
    assert rows[0][6].strip() == rows[0][7].strip() == "over" and rows[2][7].strip() != "over"


def resist_seeds(name: str) -> list[int]:
    runs = json.loads((figures.RESULTS / name / "compare.json").read_text(encoding="utf-8"))["runs"]
    return sorted(r["seed"] for r in runs if r["name"].startswith("main-resist-"))


def test_a_method_across_two_comparisons_is_paired_on_the_seeds_both_ran():
    line = figures.across_block("fmnist-study", "fmnist-study-long")[0]
    seeds, first, second, difference, low, high = re.search(
        r"\(([\d, ]+)\): (\d\.\d{4}) in `fmnist-study`, (\d\.\d{4}) in `fmnist-study-long`; paired "
        r"difference ([+-]\d\.\d{4}), 95 % interval \[([+-]\d\.\d{4}), ([+-]\d\.\d{4})\]", line).groups()
    both = sorted(set(resist_seeds("fmnist-study")) & set(resist_seeds("fmnist-study-long")))
    assert seeds == ", ".join(map(str, both)) and both == resist_seeds("fmnist-study-long")  # the rerun's seeds
    late = {(g["variant"], g["strategy"]): g["late"][0] for g in json.loads(
        (figures.RESULTS / "fmnist-study-long" / "report.json").read_text(encoding="utf-8"))["groups"]}
    assert float(second) == pytest.approx(late["main", "resist"], abs=5e-5)  # all of its seeds
    study = json.loads((figures.RESULTS / "fmnist-study" / "report.json").read_text(encoding="utf-8"))["groups"]
    mean = next(g["late"][0] for g in study if g["strategy"] == "resist" and g["variant"] == "main")
    if both != resist_seeds("fmnist-study"):  # the study's mean over the seeds both ran, not over all of its own
        assert float(first) != pytest.approx(mean, abs=5e-4)
    assert float(difference) == pytest.approx(float(second) - float(first), abs=2e-4)
    assert float(low) < float(difference) < float(high)


def test_every_methods_gain_across_two_comparisons_is_the_one_method_pairing_row_by_row():
    """The gains table pairs each method both comparisons ran on the seeds both ran: its ResIST row is the
    across block's figures; a method the second did not run is left out."""
    lines = figures.gains_block("fmnist-study", "fmnist-study-long")
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in lines if line.startswith("| ") and "---" not in line)}
    assert "depth prefix" not in rows and {"ResIST", "HeteroFL", "FedAvg"} <= set(rows)
    assert rows["method"][:2] == ["late accuracy, 80 rounds", "late accuracy, 160 rounds"]
    single = figures.across_block("fmnist-study", "fmnist-study-long")[0]
    first, second, difference, interval, seeds = rows["ResIST"]
    assert (f"({seeds}): {first} in `fmnist-study`, {second} in `fmnist-study-long`; paired difference "
            f"{difference}, 95 % interval {interval}") in single
    assert seeds == ", ".join(map(str, resist_seeds("fmnist-study-long")))


def test_a_headline_cell_with_one_paired_seed_says_so_instead_of_an_interval_of_nans():
    one = {"verdict": "n/a", "mean": 0.01, "low": math.nan, "high": math.nan, "holm": "n/a"}
    assert figures._verdict(one, "heterofl", "reference") == "**n/a** (+0.0100, one seed); Holm: **n/a**"
    two = {**one, "low": -0.2, "high": 0.22}
    assert figures._verdict(two, "heterofl", "reference") == "**n/a** (+0.0100, [-0.2000, +0.2200]); Holm: **n/a**"


def test_the_picks_block_sets_each_methods_pick_on_held_out_images_beside_its_pick_on_the_test_set(monkeypatch):
    grids = {"on-test": {"resist": {0.1: 0.80, 0.2: 0.82}, "fedavg": {0.1: 0.70, 0.2: 0.75, 0.4: 0.74}},
             "on-held-out": {"resist": {0.1: 0.86, 0.2: 0.84}, "fedavg": {0.1: 0.71, 0.2: 0.79, 0.4: None},
                             "heterofl": {0.1: 0.5}}}
    monkeypatch.setattr(figures, "_tuning", grids.__getitem__)
    lines = figures.picks_block("on-test", "on-held-out")
    assert "1 of 2 methods pick the same rate" in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "method" not in line]
    assert rows == ["| ResIST | 0.2 | 0.8200 | 0.1 | 0.8600 | **no** | -0.0200 |",
                    "| FedAvg | 0.2 | 0.7500 | 0.2 | 0.7900 | yes | - |"]
    with pytest.raises(ValueError, match="no method in both"):
        monkeypatch.setattr(figures, "_tuning", {"a": {"resist": {0.1: 0.5}}, "b": {"fedavg": {0.1: 0.5}}}.__getitem__)
        figures.picks_block("a", "b")
