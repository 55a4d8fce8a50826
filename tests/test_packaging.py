"""What ships: the app bundle ``flwr run .`` builds (the FAB, sent to every SuperNode) and the wheel hold the
product (``resist_fl``, ``server_app``, ``client_app``) and nothing else; the FAB stays far below Flower's size
limit however many results are committed under docs/ (Flower stores the FAB's files uncompressed)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli import build

ROOT = Path(__file__).resolve().parents[1]
NOT_THE_PRODUCT = ("docs/", "tests/", "simulations/", "benchmarks/", "deploy/", "examples/")


def test_the_fab_holds_the_apps_and_not_the_results_docs_or_tests():
    fab = build.build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server_app/app.py", "client_app/app.py", "resist_fl/flower/resist.py", "pyproject.toml"} <= set(names)
    assert [n for n in names if n.startswith(NOT_THE_PRODUCT)] == []
    assert len(fab) < build.FAB_MAX_SIZE / 4, f"the FAB is {len(fab):,} bytes (limit {build.FAB_MAX_SIZE:,})"


def test_the_wheel_ships_the_product_only(tmp_path):
    from hatchling.builders.wheel import WheelBuilder

    wheel = next(iter(WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"])))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "resist_fl", "server_app", "client_app"}
    assert not [n for n in names if "testing" in n.split("/")[:-1]]  # no test harness inside the library
