"""Experiment tracking: every ``metrics.jsonl`` row also goes to TensorBoard or MLflow.

``tracker`` in the run config: ``none`` (default), ``tensorboard`` (event files in
``<run dir>/tensorboard``: every number of every row as a scalar at step = round, the run config
as hyper-parameters) or ``mlflow`` (a local SQLite store, ``<run dir>/mlflow.db``, unless
``tracking-uri`` names another store or server: the run config as parameters, every number of
every row as a metric at step = round; MLflow 3 keeps its plain-file store in maintenance mode,
so the local default is the single-file database it recommends). Each needs its optional extra
(``pip install -e ".[tensorboard]"`` / ``".[mlflow]"``); without it the run stops before round 1
with that command. Once running, a tracker that fails is switched off with a WARNING: the run,
its ``metrics.jsonl`` and its checkpoints go on unaffected.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRACKERS = ("none", "tensorboard", "mlflow")
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""The ``pyproject.toml`` extra each tracker needs."""
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
"""In the run directory: the MLflow run a resumed run continues."""

logger = logging.getLogger("flwr")


class TrackerUnavailable(RuntimeError):
    """The tracker's package is not installed; the message says which extra to install."""


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (``None``, text and flags such as ``phase`` left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Scalars and hyper-parameters in TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: Path, run_config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(log_dir))
        params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in run_config.items()}
        for summary in hparams(params, {}):  # the run config in TensorBoard's HPARAMS tab
            self.writer.file_writer.add_summary(summary)

    def log_row(self, row: Mapping[str, Any], step: int) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """An MLflow run (params: the run config; metrics: the rows) in ``tracking_uri``."""

    def __init__(self, tracking_uri: str, run_name: str, run_config: Mapping[str, Any],
                 run_id: str | None = None) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name("resist-fl")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("resist-fl")
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            for name, value in run_config.items():
                self.client.log_param(run_id, name, str(value)[:500])
        self.run_id = run_id

    def log_row(self, row: Mapping[str, Any], step: int) -> None:
        for name, value in scalars(row).items():
            self.client.log_metric(self.run_id, name, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class SafeTracker:
    """A tracker whose failures never reach the run: the first one is logged as a WARNING and
    the tracker is switched off."""

    def __init__(self, name: str, tracker: Any) -> None:
        self.name, self.tracker = name, tracker

    def log_row(self, row: Mapping[str, Any], step: int) -> None:
        self._call("log_row", row, step)

    def close(self) -> None:
        self._call("close")

    def _call(self, method: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # a tracker must never stop or corrupt the run
            logger.warning("tracker %s failed (%s: %s) and is switched off; metrics.jsonl and the "
                           "checkpoints are unaffected", self.name, type(err).__name__, err)
            self.tracker = None


def require_tracker(name: str) -> None:
    """Raise :class:`TrackerUnavailable` (naming the extra) unless ``name``'s package imports."""
    if name not in EXTRAS:
        return
    try:
        if name == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        else:
            import mlflow  # noqa: F401
    except ImportError as err:
        raise TrackerUnavailable(_missing(name)) from err


def open_tracker(name: str, run_dir: Path, run_config: Mapping[str, Any], tracking_uri: str = "",
                 run_name: str = "") -> SafeTracker | None:
    """The tracker ``name`` for the run in ``run_dir`` (None for ``none``).

    A resumed MLflow run continues the MLflow run recorded in ``run_dir`` (``mlflow_run_id``).

    Raises
    ------
    ValueError
        ``name`` is not one of :data:`TRACKERS`.
    TrackerUnavailable
        Its extra is not installed.
    """
    if name not in TRACKERS:
        raise ValueError(f"tracker = {name!r}: expected one of {', '.join(TRACKERS)}")
    if name == "none":
        return None
    require_tracker(name)
    try:
        if name == "tensorboard":
            return SafeTracker(name, TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR, run_config))
        uri = tracking_uri or f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"
        id_file = Path(run_dir) / MLFLOW_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        tracker = MLflowTracker(uri, run_name or Path(run_dir).name, run_config, run_id)
        id_file.write_text(tracker.run_id + "\n")
        return SafeTracker(name, tracker)
    except Exception as err:  # e.g. an unreachable tracking server: the run goes on without it
        logger.warning("tracker %s could not start (%s: %s); the run goes on without it", name,
                       type(err).__name__, err)
        return None


def _missing(name: str) -> str:
    return (f"tracker = {name!r} needs the {EXTRAS[name]!r} extra, which is not installed: "
            f"pip install -e \".[{EXTRAS[name]}]\" (or pip install {EXTRAS[name]}), or set tracker='none'")
