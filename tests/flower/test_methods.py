"""The method table (resist_fl.run.methods): every method builds from its entry and trains end to end,
and the settings and the reports read their choices and labels from it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from resist_fl.run.methods import METHODS, STRATEGIES, label
from resist_fl.run.outputs import SUMMARY_FILE, read_metrics
from resist_fl.run.settings import RunSettings
from simulations import report
from simulations.inprocess import run_inprocess


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_method_trains_end_to_end_from_its_entry(tiny_config, name):
    config = {**tiny_config, "strategy": name, "capacity-profile": "1.0,0.5,0.25", "local-steps": 2,
              "num-server-rounds": 1, "min-train-nodes": 3, "min-available-nodes": 3, "run-name": name}
    run_inprocess(config, num_nodes=3)
    run_dir = Path(config["output-dir"]) / name
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1] and all(r["accuracy"] is not None for r in rows)
    assert {r["strategy"] for r in rows} == {name}
    assert json.loads((run_dir / SUMMARY_FILE).read_text())["strategy"] == name


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_entry_names_a_factory_beside_its_strategy(name):
    module, path = METHODS[name].factory.split(":")
    factory = importlib.import_module(module)
    for part in path.split("."):
        factory = getattr(factory, part)
    assert module.startswith("resist_fl.flower.") and callable(factory)


def test_the_settings_and_the_reports_read_the_table():
    assert STRATEGIES == tuple(METHODS)
    assert report.label is label
    assert label("resist") == "ResIST" and label("unknown") == "unknown"
    assert label("depth-tiers") == label("depth-prefix") == "depth prefix"  # a former name keeps its records
    with pytest.raises(Exception, match="strategy"):
        RunSettings.from_run_config({"strategy": "fedprox"})
