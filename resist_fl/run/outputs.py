"""What a run writes: ``metrics.jsonl``, the run config, the final model.

All files go to an absolute run directory (a ServerApp's working directory is
wherever the SuperLink started, not the project). Writes are atomic: a temp
file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from resist_fl.run.settings_error import SettingsError

METRICS_FILE = "metrics.jsonl"
NODES_FILE = "nodes.jsonl"
"""One row per node and round: what each node was sent, returned, and what its training cost."""
CONFIG_FILE = "run_config.json"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


RESULT_FILES = (METRICS_FILE, NODES_FILE, CONFIG_FILE, MODEL_FILE, SUMMARY_FILE, "checkpoint.pt")
"""The files a run writes in its directory (none may be a symbolic link)."""


def run_directory(output_dir: str, run_name: str, strategy: str) -> Path:
    """The run's absolute directory: ``output_dir/run_name`` (default: time + strategy), confined
    under ``output_dir``.

    ``run-name`` is a relative name (sub-folders allowed) without ``..``: an absolute name, a
    ``..`` part, or a name whose directory resolves outside ``output-dir`` through a symbolic
    link is a :class:`~resist_fl.run.settings_error.SettingsError`, as is a result file in it
    that is a symbolic link (a dangling one included: appends would go to its target).
    """
    base = Path(output_dir).expanduser()
    if not base.is_absolute():
        raise SettingsError(f"output-dir = {output_dir!r}: expected an absolute path (or one starting "
                            "with ~), because the ServerApp's working directory is not the project")
    name = run_name or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{strategy}"
    relative = Path(name)
    if relative.is_absolute() or name.startswith("~") or ".." in relative.parts or not relative.parts:
        raise SettingsError(f"run-name = {run_name!r}: expected a relative name inside output-dir (letters, "
                            "digits, '-', '_', '.', sub-folders with '/'), without '..' or a leading '/' or '~'")
    run_dir = base / relative
    if not run_dir.resolve().is_relative_to(base.resolve()):
        raise SettingsError(f"run-name = {run_name!r}: {run_dir} resolves to {run_dir.resolve()}, outside "
                            f"output-dir {base} (a symbolic link on the way); expected a directory inside it")
    check_result_files(run_dir)
    return run_dir


def check_result_files(run_dir: Path) -> None:
    """SettingsError if any result file of ``run_dir`` is a symbolic link (dangling or not)."""
    if linked := [f for f in RESULT_FILES if (Path(run_dir) / f).is_symlink()]:
        raise SettingsError(f"{run_dir}: {', '.join(linked)} is a symbolic link; a run writes its results "
                            "only to plain files inside its directory. Remove the link or choose another run-name")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """The JSON document at ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_metrics(run_dir: Path, *rows: Mapping[str, Any], name: str = METRICS_FILE) -> None:
    """Append rows to ``metrics.jsonl`` (or ``name``), flushed and synced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / name, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(dict(row), sort_keys=True, allow_nan=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def rewrite_metrics(run_dir: Path, rows: list[Mapping[str, Any]], name: str = METRICS_FILE) -> None:
    """Replace ``metrics.jsonl`` (or ``name``) with ``rows`` (atomically; used when resuming)."""
    text = "".join(json.dumps(dict(r), sort_keys=True, allow_nan=False) + "\n" for r in rows)
    atomic_write_bytes(Path(run_dir) / name, text.encode())


def read_metrics(run_dir: Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl`` (or ``name``; ``[]`` when ``name`` is absent
    and is not the metrics file)."""
    path = Path(run_dir) / name
    if name != METRICS_FILE and not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_model(path: Path, state_dict: Mapping[str, torch.Tensor], spec: Mapping[str, Any] | None,
               extra: Mapping[str, Any] | None = None) -> None:
    """Save a plain PyTorch state_dict with the model spec (``torch.load`` + ``build_model``);
    a user's own model has no spec (``None``): load the ``state_dict`` into that model."""
    buffer = io.BytesIO()
    spec_entry = {} if spec is None else {"model_spec": dict(spec)}
    torch.save({"state_dict": dict(state_dict), **spec_entry, **(extra or {})}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_model(path: Path | str):
    """Rebuild the model saved by :func:`save_model` (scales included), in eval mode."""
    from resist_fl.core.model import ModelSpec, build_model

    path = Path(path).expanduser()  # the docs' "~/resist-fl-runs/RUN/model.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "model_spec" not in saved:
        raise ValueError(f"{path} holds a model saved without a model spec (a user's own model): build "
                         "that model and load torch.load(path)['state_dict'] into it")
    model = build_model(ModelSpec.from_dict(saved["model_spec"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()
