"""examples/own-app: a Flower app of its own (own model, data, evaluation) using ResIST and the
RoundRecorder, run through the in-process grid; and the recorder's checks on its input."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "own-app"


@pytest.fixture(scope="module")
def own_app():
    """The example's modules, imported from its own directory (as `flwr run` would)."""
    sys.path.insert(0, str(APP_DIR))
    try:
        from own_app import client_app, server_app, task
        yield server_app, client_app, task
    finally:
        sys.path.remove(str(APP_DIR))


def app_config(tmp_path: Path, **overrides) -> dict:
    """The example's own [tool.flwr.app.config], with a test directory and ``overrides``."""
    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**config, "num-server-rounds": 2, "output-dir": str(tmp_path), **overrides}


def run_app(own_app, config: dict, num_nodes: int = 3):
    server_app, client_app, _ = own_app
    return run_inprocess(config, num_nodes=num_nodes, client=client_app.app, server=server_app.main)


def test_example_declares_its_own_flower_app():
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "own_app.server_app:app",
                                                            "clientapp": "own_app.client_app:app"}
    assert "resist-fl" in project["project"]["dependencies"]


def test_own_app_trains_subnetworks_and_records_every_round(own_app, tmp_path):
    _, _, task = own_app
    grid = run_app(own_app, app_config(tmp_path))
    run_dir = tmp_path / "own-app"
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in rows)
    assert rows[-1]["accuracy"] > 0.2  # 10 classes: above chance after two rounds (0.46 measured)
    assert rows[1]["train-loss"] < rows[0]["train-loss"]
    assert all(r["replies-accepted"] == 3 and r["num-subnetworks"] == 3 for r in rows)
    assert rows[1]["cumulative-bytes"] == sum(r["bytes-down"] + r["bytes-up"] for r in rows)

    # every node received only its sub-network: the 5 partitionable blocks of stage2 dealt out
    model = task.OwnResNet()
    full_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                     if not k.endswith("residual_scale"))
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(sent) == 6
    for message in sent:
        blocks = list(message.content["config"]["blocks"])
        assert blocks and all(b.startswith("stage2.") for b in blocks)
        assert not any(k.startswith(b + ".") for k in message.content["arrays"]
                       for b in {f"stage2.{i}" for i in range(1, 6)} - set(blocks))
    assert rows[0]["bytes-down"] < 3 * full_bytes

    nodes = read_metrics(run_dir, "nodes.jsonl")
    assert len(nodes) == 6 and {n["partition"] for n in nodes} == {0, 1, 2}
    assert all(n["status"] == "accepted" and n["bytes-up"] > 0 for n in nodes)

    # model.pt: the app's own model (no spec), which reproduces the last logged accuracy
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert "model_spec" not in saved
    from resist_fl import BlockLayout

    BlockLayout.from_model(model, task.example_batch(), stages=task.STAGES)
    model.load_state_dict(saved["state_dict"])
    assert float(saved["state_dict"]["stage2.1.residual_scale"]) == pytest.approx(1 / 3)
    assert task.test(model, task.load_test_data())[1] == pytest.approx(rows[-1]["accuracy"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final-accuracy"] == rows[-1]["accuracy"] and summary["total-bytes"] == rows[-1]["cumulative-bytes"]


def test_own_app_fedavg_baseline_sends_the_full_model(own_app, tmp_path):
    run_app(own_app, app_config(tmp_path, strategy="fedavg", **{"run-name": "fedavg"}))
    run_app(own_app, app_config(tmp_path, **{"run-name": "resist"}))
    fedavg, resist = read_metrics(tmp_path / "fedavg"), read_metrics(tmp_path / "resist")
    assert [r["strategy"] for r in fedavg] == ["fedavg", "fedavg"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in fedavg)
    assert resist[-1]["cumulative-bytes"] < fedavg[-1]["cumulative-bytes"]


def test_own_app_resumes_bit_identically(own_app, tmp_path, monkeypatch):
    server_app, _, _ = own_app
    run_app(own_app, app_config(tmp_path, **{"run-name": "whole"}))

    evaluations = []
    real_test = server_app.test

    def failing_test(model, data):  # the server stops in round 2, after round 1's checkpoint
        evaluations.append(1)
        if len(evaluations) == 2:
            raise RuntimeError("stopped")
        return real_test(model, data)

    monkeypatch.setattr(server_app, "test", failing_test)
    with pytest.raises(RuntimeError, match="stopped"):
        run_app(own_app, app_config(tmp_path, **{"run-name": "resumed"}))
    monkeypatch.setattr(server_app, "test", real_test)
    assert [r["round"] for r in read_metrics(tmp_path / "resumed")] == [1]
    with pytest.raises(FileExistsError, match="resume=true"):
        run_app(own_app, app_config(tmp_path, **{"run-name": "resumed"}))
    run_app(own_app, app_config(tmp_path, resume=True, **{"run-name": "resumed"}))

    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)["state_dict"]
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key].numpy(), resumed[key].numpy(), err_msg=key)
    drop = ("round-seconds", "client-seconds", "server-rss-mb", "merge-seconds", "eval-seconds")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "whole")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "resumed")]


@pytest.fixture()
def tiny_layout():
    from resist_fl import BlockLayout, ModelSpec

    return BlockLayout.from_spec(ModelSpec(depths=(1, 1, 3, 1), num_classes=10, in_channels=3, base_width=4))


def test_recorder_refuses_what_it_cannot_record(tiny_layout, tmp_path):
    from resist_fl import ResIST
    from resist_fl.flower.round_recorder import RoundRecorder, _numbers

    with pytest.raises(TypeError, match="expected one of the project.s strategies"):
        RoundRecorder(object(), tiny_layout, tmp_path / "a", run_config={}, num_rounds=1)
    with pytest.raises(ValueError, match="eval_every = 0"):
        RoundRecorder(ResIST(tiny_layout, capacity_measure="blocks"), tiny_layout, tmp_path / "b", run_config={},
                      num_rounds=1, eval_every=0)
    recorder = RoundRecorder(ResIST(tiny_layout, capacity_measure="blocks"), tiny_layout, tmp_path / "c",
                             run_config={}, num_rounds=1)
    with pytest.raises(ValueError, match="initial_state"):
        recorder.start(grid=None)
    with pytest.raises(KeyError, match="initial_state lacks"):
        recorder.start(grid=None, initial_state={})
    with pytest.raises(TypeError, match=r"'accuracy': 'high'"):
        _numbers({"accuracy": "high"})
    with pytest.raises(TypeError, match="names to numbers"):
        _numbers({"per-class": [0.1, 0.2]})
    assert _numbers({"loss": float("nan"), "accuracy": np.float32(0.5), "n": np.int64(3)}) == \
        {"loss": None, "accuracy": 0.5, "n": 3}


def test_resume_restores_the_strategys_round_offset(tiny_layout, tmp_path):
    from resist_fl import ResIST
    from resist_fl.flower.round_recorder import RoundRecorder
    from resist_fl.run.checkpoint import Checkpoint, CheckpointError, capture_rngs

    rows = [{"round": 1, "num-subnetworks": 4, "held-fraction": 0.25, "cumulative-bytes": 10}]
    Checkpoint(1, {"w": np.zeros(2, np.float32)}, {"seed": 0, "resume": False}, rows, *capture_rngs()).save(tmp_path)
    strategy = ResIST(tiny_layout, capacity_measure="blocks")
    recorder = RoundRecorder(strategy, tiny_layout, tmp_path, run_config={"seed": 0, "resume": True},
                             num_rounds=3, resume=True)
    assert (recorder.completed_rounds, strategy.round_offset) == (1, 1)
    assert (strategy.num_subnetworks, strategy.held_fraction(), recorder.cumulative_bytes) == (4, 0.25, 10)
    with pytest.raises(CheckpointError, match="seed: 0 -> 1"):
        RoundRecorder(ResIST(tiny_layout, capacity_measure="blocks"), tiny_layout, tmp_path, run_config={"seed": 1,
                      "resume": True},
                      num_rounds=3, resume=True)


@pytest.mark.parametrize("transport", ["float32", "float16", "uint8"])
def test_a_users_strategy_sets_the_transport_for_either_client_app(own_app, transport):
    """Issue 22: ``ResIST(layout, transport_dtype=...)`` built by a user's ServerApp, with a train config
    of the app's own hyper-parameters only, is understood by the example's ClientApp and by the
    project's: the strategy stamps the encoding (and the run round) into every message."""
    from flwr.app import ArrayRecord, ConfigRecord

    from client_app.app import app as project_client_app
    from resist_fl import BlockLayout, ResIST
    from resist_fl.core.model import ModelSpec, build_model
    from server_app.app import model_config
    from simulations.inprocess_grid import InProcessGrid

    _, client_app, task = own_app
    model = task.OwnResNet()
    layout = BlockLayout.from_model(model, task.example_batch(), stages=task.STAGES)
    spec = ModelSpec(depths=(1, 1, 4, 1), base_width=4)
    project_config = {**tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
                      ["tool"]["flwr"]["app"]["config"], "dataset": "synthetic", "stage-depths": "1,1,4,1",
                      "base-width": 4, "local-steps": 2, "batch-size": 16}
    cases = [(client_app.app, layout, model.state_dict(), {}, ConfigRecord(
                 {"local-steps": 2, "batch-size": 16, "lr": 0.05, "seed": 0})),
             (project_client_app, BlockLayout.from_spec(spec), build_model(spec).state_dict(), project_config,
              model_config(spec))]
    for app, app_layout, state, run_config, train_config in cases:
        strategy = ResIST(app_layout, min_train_nodes=2, min_available_nodes=2, transport_dtype=transport,
                          capacity_measure="blocks")
        initial = ArrayRecord({k: v for k, v in state.items() if k in set(app_layout.payload_keys())})
        result = strategy.start(InProcessGrid(app, num_nodes=2, run_config=run_config), initial_arrays=initial,
                                num_rounds=2, train_config=train_config)
        for run_round in (1, 2):
            assert result.train_metrics_clientapp[run_round]["replies-accepted"] == 2, (app, transport)
        moved = [k for k in initial if not np.array_equal(result.arrays[k].numpy(), initial[k].numpy())]
        assert moved
