"""docs/layout.md names every module of the product and of the tooling around it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("resist_fl", "server_app", "client_app", "simulations", "benchmarks", "deploy")


def test_the_layout_page_names_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    modules = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 50
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if p.name not in page)
    assert missing == [], f"docs/layout.md does not name: {missing}"
