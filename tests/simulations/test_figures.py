"""The figures quoted in the README and docs are regenerated from the committed raw results."""

from __future__ import annotations

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
