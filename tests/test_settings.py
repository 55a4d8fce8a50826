"""The run config: pyproject defaults, the settings class and the README agree."""

import re

from resist_fl.run.settings import RunSettings, main, with_table
from tests.conftest import ROOT, default_run_config


def test_pyproject_defaults_are_the_settings_defaults():
    assert RunSettings.from_run_config(default_run_config()) == RunSettings()
    assert RunSettings().to_run_config() == default_run_config()


def test_readme_documents_every_run_config_key():
    """The README's table is the one generated from the settings' fields (so it cannot disagree)."""
    readme = (ROOT / "README.md").read_text()
    assert with_table(readme) == readme, "stale: python -m resist_fl.run.settings --write README.md"
    table = readme.split("## Run config", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z][a-z0-9-]+)`", table, re.M))
    assert set(default_run_config()) == documented, set(default_run_config()) ^ documented
    assert main(["--check", str(ROOT / "README.md")]) == 0
