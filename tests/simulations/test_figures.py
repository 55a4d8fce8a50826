"""The figures quoted in the README and docs are regenerated from the committed raw results."""

from __future__ import annotations

import json
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


def test_the_verdicts_block_gives_the_paired_rules_words_and_the_budgets_exceeded():
    from simulations import report
    from simulations.node_costs import node_summary

    lines = figures.verdicts_block("fmnist-study")
    _, _, groups = figures._main_groups("fmnist-study")
    assert {variant for variant, _ in groups} == {report.MAIN_VARIANT}  # ablations stay in the report
    rows = {r["strategy"]: r for r in report.paired_rows(groups)}
    by_word = {line.split("**")[1]: line for line in lines if line.startswith("- **")}
    assert set(by_word) == {"wins", "ties", "loses"}
    for strategy, row in rows.items():  # every method once, under the word the paired rule gave it
        label = report.group_label(report.MAIN_VARIANT, strategy)
        assert f"{label} ({row['mean']:+.4f}, [{row['low']:+.4f}, {row['high']:+.4f}]" in by_word[row["verdict"]]
        budgets = node_summary([figures.RESULTS / "fmnist-study" / r.name
                                for r in groups[(report.MAIN_VARIANT, strategy)]])["budget-by-capacity"]
        line = by_word[row["verdict"]]
        entry = line[line.index(f"{label} ({row['mean']:+.4f}") + len(label) + 2:].split(")", 1)[0]
        assert ("over budget" in entry) == any(used > 1 + 1e-6 for used in budgets.values()), (label, budgets)
    assert "FedAvg (" in by_word["wins"] and "over budget at capacity 0.5, 0.25, 0.125, 0.0625" in by_word["wins"]


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
