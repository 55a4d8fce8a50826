"""Shared fixtures: a tiny, fast run config on synthetic data."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import torch

from tests.digits_files import write_digits_npz

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each, no oversubscription
    torch.set_num_threads(1)

TINY_OVERRIDES = {
    "dataset": "synthetic", "stage-depths": "1,1,4,1", "base-width": 8, "local-steps": 8,
    "batch-size": 32, "eval-batch-size": 250, "num-server-rounds": 2, "run-name": "test",
}


def default_run_config() -> dict:
    """The app's defaults, as pyproject.toml declares them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


@pytest.fixture
def tiny_config(tmp_path):
    """Run config of a tiny model on synthetic data writing under ``tmp_path``."""
    return {**default_run_config(), **TINY_OVERRIDES, "output-dir": str(tmp_path / "runs")}


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> str:
    """Path of the real digits image set written as a user's ``.npz``."""
    return write_digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz")


@pytest.fixture(autouse=True, scope="session")
def _server_task_identity():
    """Building a Flower ``Message`` outside a running app needs the ServerApp's task identity
    (FLOWER_NOTES.md); set it once, so that no test depends on another having run first."""
    from simulations.inprocess_grid import set_server_task_identity

    set_server_task_identity()


@pytest.fixture(autouse=True)
def _node_state_home(tmp_path, monkeypatch):
    """Each test's nodes keep their local-DP ledgers in its own directory (never the user's
    ``~/.local/state``), so no test sees another's epsilon."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "node-state"))


@pytest.fixture
def crash_at_round(monkeypatch):
    """``crash_at_round(config, num_nodes, n)``: run the ServerApp in process until its evaluation
    of run round ``n`` raises (a crash after ``n - 1`` recorded rounds, round ``n`` trained), then
    restore the evaluation so that a resumed run can follow."""
    import server_app.app as server_app
    from simulations.inprocess import run_inprocess

    evaluate = server_app.CentralEvaluation.__call__

    def crash(config: dict, num_nodes: int, run_round: int) -> None:
        def stop(self, this_round, state, widths):
            if this_round == run_round:
                raise RuntimeError("stopped")
            return evaluate(self, this_round, state, widths)

        monkeypatch.setattr(server_app.CentralEvaluation, "__call__", stop)
        try:
            with pytest.raises(RuntimeError, match="stopped"):
                run_inprocess(config, num_nodes=num_nodes)
        finally:
            monkeypatch.setattr(server_app.CentralEvaluation, "__call__", evaluate)

    return crash
