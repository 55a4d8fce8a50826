"""The README's first command on a machine without network: the default job finishes on the real
digits that ship with the install, and a data set that needs the hub says why and what to do
instead as the last lines the user sees."""

from __future__ import annotations

import pytest

from resist_fl.run.outputs import read_metrics
from simulations.launcher import run_flwr
from tests.apps.test_flwr_run import ROOT

pytestmark = pytest.mark.slow  # the real flwr run engine

NO_NETWORK = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
              "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
              "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for key, value in NO_NETWORK.items():  # every hub request fails: offline, and through a dead proxy
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    return tmp_path


def test_the_default_job_finishes_offline_on_the_bundled_digits(offline):
    config = {"output-dir": str(offline / "runs"), "run-name": "default-job"}  # nothing else: the defaults
    result = run_flwr(ROOT, config, num_supernodes=2, timeout_s=600, workdir=offline / "logs")
    assert result.success, f"{result.reason}\n{result.log_path.read_text()[-3000:]}"
    rows = read_metrics(result.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["strategy"] == "resist"
    assert rows[-1]["accuracy"] > 0.8  # real 8x8 digits, 5 rounds (chance: 0.1)
    log = result.log_path.read_text()
    assert "data digits, images 1x8x8" in log and "[round 5/5] resist acc=" in log


def test_a_hub_data_set_offline_ends_with_the_reason_and_the_alternatives(offline):
    """The run fails (status failed, not completed), and the last thing of the app's own a user sees
    is the reason and the offline alternatives; only Flower's exit-code report follows it."""
    config = {"dataset": "cifar10", "output-dir": str(offline / "runs"), "run-name": "cifar-offline"}
    result = run_flwr(ROOT, config, num_supernodes=2, timeout_s=300, workdir=offline / "logs")
    assert not result.success and not (result.run_dir / "metrics.jsonl").exists()
    assert result.status == "finished:failed" and "could not load dataset 'cifar10'" in result.reason
    lines = [line for line in result.log_path.read_text().splitlines() if line.strip()]
    last_ours = max(i for i, line in enumerate(lines) if "could not load dataset 'cifar10'" in line)
    assert "To run offline: dataset='digits'" in lines[last_ours] and "dataset='synthetic'" in lines[last_ours]
    after = lines[last_ours + 1:]
    assert len(after) <= 8 and all("Exit Code" in a or "unhandled exception" in a or "flower.ai/docs" in a
                                   or "Will push" in a for a in after), after
