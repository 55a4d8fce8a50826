"""Planned runs written as run-config files, run configs as TOML files, stopping the local SuperLink."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib

import psutil
from flwr.common.config import parse_config_args

from resist_fl.run.cli_config import write_run_config
from deploy import local_superlink
from simulations import compare, launcher
from simulations.presets import list_presets


def test_a_preset_is_written_as_a_run_config_file_at_launch(tmp_path, capsys):
    """One preset format: no TOML copy is committed; the runner writes any planned run as a run-config file,
    exactly the config it would launch (strategy-config entries, a grid's first cell and ablations included)."""
    assert not (compare.PROJECT_DIR / "conf").exists()
    for name in list_presets():
        path = tmp_path / f"{name}.toml"
        assert compare.main([name, "--write-run-config", str(path)]) == 0
        config, plan, _ = compare.resolve(compare.parse_args([name]))
        reported = [r for r in plan if not r.variant.startswith("tune-")] or plan  # a grid alone: its tuning runs
        run = next((r for r in reported if r.strategy == "resist"), reported[0])
        assert parse_config_args([str(path)]) == run.run_config == tomllib.loads(path.read_text())
        resources = launcher.federation_config(*(config.federation[k] for k in (
            "num-supernodes", "num-cpus-per-client", "num-gpus-per-client")))
        command = f"flwr run . --stream --run-config {path} --federation-config \"{resources}\""
        assert command in path.read_text() and command in capsys.readouterr().out
    # a method's own strategy-config entry reaches the file (a flat copy of run-config alone lost it)
    path = tmp_path / "warmup.toml"
    assert compare.main(["quick-warmup", "--write-run-config", str(path)]) == 0
    assert parse_config_args([str(path)])["warmup-rounds"] == 2
    assert compare.main(["quick-cpu", "--write-run-config", str(path), "--run", "main-fedavg-seed0"]) == 0
    assert parse_config_args([str(path)])["strategy"] == "fedavg"
    assert compare.main(["quick-cpu", "--write-run-config", str(path), "--run", "main-nope-seed0"]) == 2
    assert "--run 'main-nope-seed0': expected one of main-resist-seed0" in capsys.readouterr().err
    assert compare.main(["no-such-preset", "--write-run-config", str(tmp_path / "x.toml")]) == 2


def test_awkward_strings_survive_the_toml_run_config(tmp_path):
    config = {"run-name": "it's \"both\" quotes", "data-path": "/data/a b\\c", "stage-depths": "1,1,4,1",
              "description": "line one\nline two\ttab", "unicode": "Zürich – 東京", "resume": False,
              "lr": 0.05, "num-server-rounds": 3, "empty": ""}
    path = write_run_config(config, tmp_path / "run.toml", header="a header\nof two lines")
    assert path.read_text().startswith("# a header\n# of two lines\n")
    assert parse_config_args([str(path)]) == config  # what flwr run --run-config FILE.toml reads


def test_local_superlink_is_stopped_by_pid(tmp_path):
    fake = tmp_path / "bin" / "flower-superlink"
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(120)\n")
    home = tmp_path / "flwr-home"
    proc = subprocess.Popen([sys.executable, str(fake)], env={**os.environ, "FLWR_HOME": str(home)})
    try:
        deadline = time.monotonic() + 10
        while not local_superlink.superlink_pids(home) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert local_superlink.superlink_pids(home) == [proc.pid]
        assert local_superlink.superlink_pids(tmp_path / "another-home") == []
        started = time.monotonic()
        assert local_superlink.main(["stop", "--flwr-home", str(home)]) == 0
        proc.wait(timeout=10)  # (psutil may have reaped it already: then Popen reports 0)
        assert time.monotonic() - started < 15  # stopped, long before its 120 s sleep would end
        assert not psutil.pid_exists(proc.pid) and local_superlink.superlink_pids(home) == []
    finally:
        proc.kill()
