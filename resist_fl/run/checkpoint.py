"""Per-round checkpoints for resuming a run.

A checkpoint holds the global arrays, the last finished round, the run
config, the metrics rows so far and the RNG states. It is written atomically
after every round (temp file + rename), so a crash leaves the previous one
intact. Loading refuses a corrupt, truncated or foreign file with a clear
message and never modifies it.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resist_fl.run.outputs import (
    METRICS_FILE,
    NODES_FILE,
    atomic_write_bytes,
    check_result_files,
    read_metrics,
    rewrite_metrics,
)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "resist-fl-checkpoint/1"
_FIELDS = ("server_round", "arrays", "run_config", "metrics", "python_rng", "torch_rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume; the message says why and what to do."""


@dataclass
class Checkpoint:
    server_round: int
    arrays: dict[str, np.ndarray]
    run_config: dict[str, Any]
    metrics: list[dict[str, Any]]
    python_rng: tuple
    torch_rng: torch.Tensor

    def save(self, run_dir: Path) -> None:
        buffer = io.BytesIO()
        torch.save({
            "format": FORMAT, "server_round": self.server_round,
            "arrays": {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in self.arrays.items()},
            "run_config": self.run_config, "metrics": self.metrics,
            "python_rng": self.python_rng, "torch_rng": self.torch_rng,
        }, buffer)
        atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, buffer.getvalue())

    @classmethod
    def load(cls, run_dir: Path) -> "Checkpoint":
        path = Path(run_dir) / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"resume = true but there is no checkpoint at {path}; start the run "
                                  "without resume, or set run-name to the run you want to continue")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                                  f"{err}); it was left untouched. Restore a good copy or start a new "
                                  "run-name.") from err
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a resist-fl checkpoint (expected format {FORMAT}); "
                                  "it was left untouched")
        return cls.from_mapping(raw, path)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], path: Path | str = "checkpoint") -> "Checkpoint":
        """The checkpoint in ``raw`` (what ``torch.load`` gave), every field checked: a missing
        field, a wrong type, a non-integer round, a metrics row that is not a mapping, a NaN or
        Inf anywhere in the arrays or the metrics, or RNG states that do not restore are each a
        :class:`CheckpointError` naming the field (the file is never modified)."""
        def bad(field: str, expected: str, got: Any) -> CheckpointError:
            shown = repr(got) if not isinstance(got, (Mapping, list, tuple, torch.Tensor)) else type(got).__name__
            return CheckpointError(f"checkpoint {path}: {field} is {shown[:80]}, expected {expected}; the file "
                                   "was left untouched. Restore a good copy or start a new run-name.")

        if missing := [k for k in _FIELDS if k not in raw]:
            raise CheckpointError(f"checkpoint {path} lacks the field(s) {', '.join(missing)}; the file was left "
                                  "untouched. Restore a good copy or start a new run-name.")
        server_round = raw["server_round"]
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise bad("server_round", "a whole number of rounds >= 0", server_round)
        if not isinstance(raw["arrays"], Mapping):
            raise bad("arrays", "a mapping of state_dict names to tensors", raw["arrays"])
        arrays = {}
        for key, value in raw["arrays"].items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise bad(f"arrays[{key!r}]", "a tensor under a state_dict name", value)
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise bad(f"arrays[{key!r}]", "finite values", "an array holding NaN or Inf")
            arrays[key] = value.numpy()
        if not isinstance(raw["run_config"], Mapping):
            raise bad("run_config", "a mapping of run-config keys to values", raw["run_config"])
        if not isinstance(raw["metrics"], (list, tuple)):
            raise bad("metrics", "a list of metrics rows", raw["metrics"])
        for index, row in enumerate(raw["metrics"]):
            if not isinstance(row, Mapping):
                raise bad(f"metrics[{index}]", "a mapping (one metrics row)", row)
            number = row.get("round")
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= server_round:
                raise bad(f"metrics[{index}]['round']", f"a round in [1, {server_round}]", number)
            for name, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise bad(f"metrics[{index}][{name!r}]", "a finite number (or null)", value)
        python_rng = _as_tuple(raw["python_rng"])
        try:
            random.Random().setstate(python_rng)
        except (TypeError, ValueError) as err:
            raise bad("python_rng", f"a state of random.getstate() ({err})", raw["python_rng"]) from None
        torch_rng = raw["torch_rng"]
        try:
            torch.Generator().set_state(torch_rng)
        except (TypeError, RuntimeError, ValueError) as err:
            raise bad("torch_rng", f"a state of torch.get_rng_state() ({err})", torch_rng) from None
        return cls(server_round=server_round, arrays=arrays, run_config=dict(raw["run_config"]),
                   metrics=[dict(r) for r in raw["metrics"]], python_rng=python_rng, torch_rng=torch_rng)

    def restore_rngs(self) -> None:
        random.setstate(self.python_rng)
        torch.set_rng_state(self.torch_rng)


def capture_rngs() -> tuple[tuple, torch.Tensor]:
    return random.getstate(), torch.get_rng_state()


def _as_tuple(value: Any) -> Any:
    """torch.load gives lists where random.getstate() had tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint written under a different run config.

    Only ``resume`` may differ, and ``num-server-rounds`` (to extend a run)
    when the learning rate is constant: the step and cosine schedules depend
    on the total number of rounds.
    """
    may_differ = {"resume"}
    if saved.get("lr-schedule") == current.get("lr-schedule") == "constant":
        may_differ.add("num-server-rounds")
    keys = (set(saved) | set(current)) - may_differ
    if diff := sorted(k for k in keys if saved.get(k) != current.get(k)):
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise CheckpointError(f"cannot resume: the run config differs from the checkpoint's ({details})")


def open_run_directory(run_dir: Path, run_config: Mapping[str, Any], resume: bool) -> Checkpoint | None:
    """Make ``run_dir`` ready for a run; return the checkpoint to continue from when ``resume``.

    A new run refuses a directory that already holds results, so nothing is overwritten. A
    resumed run needs the directory's checkpoint written under the same ``run_config``
    (:func:`check_same_run`); ``metrics.jsonl`` and ``nodes.jsonl`` are cut back to the
    checkpoint's last round, so rounds after it are not listed twice.
    """
    run_dir = Path(run_dir)
    check_result_files(run_dir)
    if not resume:
        if (run_dir / METRICS_FILE).exists() or (run_dir / CHECKPOINT_FILE).exists():
            raise FileExistsError(f"{run_dir} already holds a run; set resume=true to continue it, "
                                  "or choose another run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / NODES_FILE).unlink(missing_ok=True)  # rows of a first round that stopped before its checkpoint
        return None
    checkpoint = Checkpoint.load(run_dir)
    check_same_run(checkpoint.run_config, run_config)
    rewrite_metrics(run_dir, checkpoint.metrics)
    done = checkpoint.server_round
    rewrite_metrics(run_dir, [r for r in read_metrics(run_dir, NODES_FILE) if r["round"] <= done], NODES_FILE)
    return checkpoint
