"""A node's local-DP privacy ledger, kept on the node's own disk so that it outlives the process.

Under ``dp='local'`` a node's epsilon is the composition of every DP-SGD step it ever ran on its
examples in a run. Flower's ``context.state`` lives in the SuperNode's memory: a restarted
SuperNode (or a resumed run, which Flower starts as a new run) would start again at zero and
understate the node's epsilon. The ledger is a JSON file per (run, node) under the node's state
directory, written atomically after every round:

- the run is the run config's ``run-name`` when set (a resumed run has the same name, so its
  epsilon continues), else Flower's run id;
- the node is its ``partition-id`` when it has one (a restarted SuperNode keeps it), else its
  node id;
- the directory is the node config's ``dp-ledger-dir``, else ``$XDG_STATE_HOME/resist-fl/dp-ledger``
  (``~/.local/state/resist-fl/dp-ledger``).

A round trained twice (the round in progress when a run stopped, trained again after a resume) is
charged twice: both updates left the node.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

History = list[tuple[float, float, int]]
"""Opacus' accountant history: (noise multiplier, sample rate, steps) per composition."""

LEDGER_DIR_KEY = "dp-ledger-dir"
_FILE_NAME = "{run}--{node}.json"


def ledger_dir(node_config: Mapping[str, object]) -> Path:
    """Where this node keeps its ledgers: node config ``dp-ledger-dir``, else the XDG state home."""
    if LEDGER_DIR_KEY in node_config:
        return Path(str(node_config[LEDGER_DIR_KEY])).expanduser()
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "resist-fl" / "dp-ledger"


def ledger_path(node_config: Mapping[str, object], run_name: str, run_id: int, node_id: int) -> Path:
    """The ledger file of this (run, node)."""
    run = f"run-{_safe(run_name)}" if run_name else f"flower-run-{int(run_id)}"
    partition = node_config.get("partition-id")
    has_partition = isinstance(partition, int) and not isinstance(partition, bool)
    node = _partition_node(node_config) if has_partition else f"node-{int(node_id)}"
    return ledger_dir(node_config) / _FILE_NAME.format(run=run, node=node)


def partition_ledgers(node_config: Mapping[str, object]) -> list[Path]:
    """Every ledger of this node's ``partition-id`` in its ledger directory, one per run (any run name)."""
    directory = ledger_dir(node_config)
    pattern = _FILE_NAME.format(run="*", node=_partition_node(node_config))
    return sorted(directory.glob(pattern)) if directory.is_dir() else []


@contextmanager
def partition_lock(node_config: Mapping[str, object]) -> Iterator[None]:
    """Hold an exclusive lock on this node's ``partition-id`` in its ledger directory (``fcntl.flock``, released
    when the process dies): what runs inside sees every ledger another run of the partition wrote before it."""
    directory = ledger_dir(node_config)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".lock--{_partition_node(node_config)}", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _partition_node(node_config: Mapping[str, object]) -> str:
    """The node's name in its ledger and lock files: its ``partition-id``, which a restarted SuperNode keeps."""
    return f"partition-{int(node_config['partition-id'])}"  # type: ignore[call-overload]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]


def read_history(path: Path) -> History:
    """The compositions recorded in ``path`` (none if it does not exist); ValueError on a damaged file
    (a node must not silently restart its epsilon at zero)."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["history"]
        return [(float(z), float(q), int(steps)) for z, q, steps in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"dp ledger {path}: unreadable ({err}); refusing to restart this node's epsilon at "
                         "zero. Restore the file, or remove it if no round of this run was trained") from err


def write_history(path: Path, history: History) -> None:
    """Record ``history`` in ``path`` atomically (a crash leaves the old or the new ledger, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"history": [[float(z), float(q), int(s)] for z, q, s in history]}))
    os.replace(tmp, path)
