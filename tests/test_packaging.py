"""The app bundle ``flwr run .`` builds (the FAB) holds the apps' code and stays far below Flower's size limit,
however many results are committed under docs/ (Flower stores the FAB's files uncompressed)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli import build

ROOT = Path(__file__).resolve().parents[1]


def test_the_fab_holds_the_apps_and_not_the_results_docs_or_tests():
    fab = build.build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server_app/app.py", "client_app/app.py", "resist_fl/flower/resist.py", "pyproject.toml"} <= set(names)
    assert [n for n in names if n.startswith(("docs/", "tests/"))] == []
    assert len(fab) < build.FAB_MAX_SIZE / 4, f"the FAB is {len(fab):,} bytes (limit {build.FAB_MAX_SIZE:,})"
