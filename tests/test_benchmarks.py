"""Smoke tests: the benchmark scripts keep working (on tiny settings; speed is not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bytes_benchmark_matches_the_analytic_fraction(capsys):
    assert load("bytes_benchmark").main(["--model", "preact_resnet34", "--width", "4", "--sites", "2", "4",
                                         "--min-blocks", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert len(rows) == 2 * 2 * 3  # sites x min depth x transport
    for row in rows:
        ratio, analytic, compressed = float(row[5]), float(row[6]), float(row[8])
        assert abs(ratio / analytic - 1) < 0.005
        if row[0].strip() == "4" and row[1].strip() == "0":
            assert ratio < 0.8  # four sub-networks of a five-block stage: far below four full models
        assert {"float32": 1.0, "float16": 0.5, "uint8": 0.25}[row[2].strip()] <= compressed < 1.01 * {
            "float32": 1.0, "float16": 0.53, "uint8": 0.29}[row[2].strip()]
