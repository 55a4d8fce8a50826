"""Experiment tracking (TensorBoard, MLflow) of every metrics row; a failing tracker never stops a
run; the round line's ETA."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from resist_fl.run.outputs import read_metrics
from resist_fl.run.settings import SettingsError
from resist_fl.run.timing import eta
from resist_fl.run.tracking import MLFLOW_RUN_ID_FILE, TensorBoardTracker, scalars
from simulations.inprocess import run_inprocess


def tracked_run(tiny_config, tracker: str, **extra) -> tuple[Path, list[dict]]:
    config = {**tiny_config, "tracker": tracker, "warmup-rounds": 1, **extra}
    run_inprocess(config, num_nodes=2)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    return run_dir, read_metrics(run_dir)


def test_tensorboard_holds_every_metric_of_every_round(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows = tracked_run(tiny_config, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = {name for row in rows for name in scalars(row)}
    assert {"accuracy", "train-loss", "bytes-down", "cumulative-bytes", "inference-scale"} <= expected
    assert set(events.Tags()["scalars"]) == expected
    for name in expected:
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged == pytest.approx({r["round"]: r[name] for r in rows if scalars(r).get(name) is not None})
    assert events.PluginTagToContent("hparams")  # the run config as hyper-parameters


def test_mlflow_run_has_the_params_and_every_metric(tiny_config):
    import mlflow

    run_dir, rows = tracked_run(tiny_config, "mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / MLFLOW_RUN_ID_FILE).read_text().strip())
    assert run.data.params["lr"] == str(tiny_config["lr"]) and run.data.params["tracker"] == "mlflow"
    assert run.info.status == "FINISHED"
    for name in {n for row in rows for n in scalars(row)}:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == pytest.approx({r["round"]: r[name] for r in rows if scalars(r).get(name) is not None})


def test_a_failing_tracker_warns_and_the_run_goes_on(tiny_config, monkeypatch, caplog):
    def broken(self, row, step):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log_row", broken)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_dir, rows = tracked_run(tiny_config, "tensorboard")
    assert [r["round"] for r in rows] == [1, 2] and (run_dir / "model.pt").is_file()
    warnings = [r.getMessage() for r in caplog.records if "tracker tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0]


def test_an_unreachable_tracking_server_does_not_stop_the_run(tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, rows = tracked_run(tiny_config, "mlflow", **{"tracking-uri": "nosuchscheme://nowhere"})
    assert [r["round"] for r in rows] == [1, 2]
    assert any("tracker mlflow could not start" in r.getMessage() for r in caplog.records)


def test_a_missing_extra_is_named_before_round_one(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(SettingsError, match=r"pip install -e \"\.\[mlflow\]\""):
        run_inprocess({**tiny_config, "tracker": "mlflow"}, num_nodes=2)
    assert not (Path(tiny_config["output-dir"]) / tiny_config["run-name"]).exists()
    with pytest.raises(SettingsError, match="tracker = 'wandb'"):
        run_inprocess({**tiny_config, "tracker": "wandb"}, num_nodes=2)


def test_eta_is_the_mean_round_time_times_the_rounds_left():
    assert eta([10.0, 20.0], 3) == "45 s"
    assert eta([100.0], 2) == "3 min 20 s"
    assert eta([1800.0], 3) == "1 h 30 min"
    assert eta([5.0], 0) == eta([], 4) == "0 s"
