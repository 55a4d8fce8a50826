"""What a run of any of the project's strategies records each round, for any ServerApp.

:class:`RoundRecorder` is the ``evaluate_fn`` a ServerApp hands to ``Strategy.start``. After
every round it evaluates the global model with the caller's own evaluation, appends a row to
``metrics.jsonl`` (bytes metered on the Grid, the accepted replies' figures, the evaluation's
metrics, divergence flags) and one row per trained node to ``nodes.jsonl``, and writes the
checkpoint a resumed run continues from. It works with any model whose :class:`BlockLayout` the
strategy was built on: the project's PreActResNets, torchvision's ResNets or a user's own
(:meth:`BlockLayout.from_model`). The project's ServerApp is one caller; ``examples/own-app``
is another.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from resist_fl.core.model_cost import max_depth
from resist_fl.core.decomposition import BlockLayout, scale_key
from resist_fl.flower.metering import MeteredGrid, RoundTraffic
from resist_fl.flower.round_report import NodeReport, RecordedStrategy, RoundReport, RunStops
from resist_fl.node.peak_memory import MEASURES, resident_memory_mb
from resist_fl.node.precision import PRECISIONS
from resist_fl.run.checkpoint import Checkpoint, capture_rngs, open_run_directory
from resist_fl.run.divergence import DIVERGENCE_HINT, divergence_reason
from resist_fl.run.outputs import (MODEL_FILE, NODES_FILE, SUMMARY_FILE, append_metrics, read_metrics, save_model,
                                   write_json)
from resist_fl.run.timing import eta
from resist_fl.run.tracking import SafeTracker

PRIVATE_DROPPED = ("train-loss", "client-seconds", "train-seconds", "simulated-seconds", "peak-memory-mb",
                   "memory-measure", "blocks-per-second", "device-cache-mb", "num-examples", "local-steps",
                   "precision")
"""Figures of the nodes' training that no DP noise covers: under DP neither the nodes send them
(:func:`resist_fl.flower.client_side.train_reply` with ``private``) nor does the recorder write
them (``blocks-per-second`` is the server's own timing of a node: a side channel as well)."""


class TargetReached(Exception):
    """Raised from the evaluate_fn to end ``Strategy.start`` once the target accuracy is reached
    (Flower 1.42's ``start`` has no stop condition); caught by :meth:`RoundRecorder.start`."""


Evaluation = Callable[[int, dict[str, torch.Tensor], frozenset[float]], Mapping[str, float]]
"""``evaluation(run_round, state, widths)``: metrics of the global model whose ``state_dict`` is ``state``
(residual scales included), e.g. ``{"loss": 0.41, "accuracy": 0.88}``; numbers only. ``widths``: every
share below 1 of the global model's channels that a node has held so far, from the round reports (a width
method's rates; empty for the others), for an evaluation of the global model at those widths."""


def full_state(arrays: ArrayRecord, layout: BlockLayout, scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The global model's state_dict: trained arrays plus every block's residual scale
    (``scales[block]`` for a partitioned block, 1.0 for the others)."""
    state = arrays.to_torch_state_dict()
    for key in layout.keys:
        if key not in state:  # scale buffers: 1.0 unless partitioned (then the inference scale)
            block = key.rsplit(".", 1)[0]
            if scale_key(block) != key:
                raise KeyError(f"the global arrays lack {key!r}")
            state[key] = torch.tensor(float(scales.get(block, 1.0)))
    return {k: state[k] for k in layout.keys}


class RoundRecorder:
    """Per-round metrics, node costs, checkpoint/resume and byte metering for a ServerApp.

    Parameters
    ----------
    strategy : RecordedStrategy
        The strategy the run uses (ResIST, ScreenedFedAvg, or any strategy with the declared
        :class:`~resist_fl.flower.round_report.RecordedStrategy` methods); what it reports is
        read through :meth:`~RecordedStrategy.round_report` only, and on resume
        :meth:`~RecordedStrategy.resume_after` continues it from the checkpoint.
    layout : BlockLayout
        The global model's layout (the one ``strategy`` was built on).
    run_dir : Path
        Absolute directory of the run's files (a ServerApp's working directory is not the project).
    run_config : Mapping
        Saved in every checkpoint; a resumed run must have the same (:func:`check_same_run`).
    num_rounds : int
        Rounds of the whole run (a resumed run does only those left); the last is always evaluated.
    evaluation : callable, optional
        ``evaluation(run_round, state, widths) -> {name: number}`` (:data:`Evaluation`), called on
        every ``eval_every``-th round and the last; its metrics go into the round's row (``accuracy`` and ``loss`` are
        ``null`` in rows without them).
    eval_every : int
        Evaluate every this many rounds.
    inference_scaling : bool
        Evaluate ResIST's global model with its inference scales (the paper); False: scale 1.0.
    resume : bool
        Continue the run in ``run_dir`` from its checkpoint; otherwise ``run_dir`` must hold no run.
    target_accuracy : float, optional
        Stop the run after the first evaluated round whose ``accuracy`` reaches it (its round is
        recorded in ``summary.json`` as ``target-reached-round``); None or 0: run every round.
    tracker : optional
        Also sends every row there (:func:`resist_fl.run.tracking.open_tracker`; its failures
        are warnings, never the run's); closed by :meth:`finish`.
    dp : str
        The run's DP mode (``none``, ``central``, ``local``). Under DP no figure of a node's
        training that no noise covers is written (:data:`PRIVATE_DROPPED`: losses, times, memory,
        speeds).
    secret_sample : bool
        Central DP with ``dp-sampling='secret'``: ``nodes.jsonl`` gets no rows (who took part in a
        round must not be published).
    """

    def __init__(self, strategy: RecordedStrategy, layout: BlockLayout, run_dir: Path, *,
                 run_config: Mapping[str, Any], num_rounds: int, evaluation: Evaluation | None = None,
                 eval_every: int = 1, inference_scaling: bool = True, resume: bool = False,
                 tracker: SafeTracker | None = None,
                 target_accuracy: float | None = None, dp: str = "none", secret_sample: bool = False) -> None:
        if not isinstance(strategy, RecordedStrategy):
            raise TypeError(f"strategy: expected one of the project's strategies (a RecordedStrategy: round_report, "
                            f"inference_scales, resume_after, sampler, label), got {type(strategy).__name__}")
        if eval_every < 1:
            raise ValueError(f"eval_every = {eval_every}: expected a positive integer")
        self.strategy, self.layout, self.run_dir = strategy, layout, Path(run_dir)
        self.run_config, self.num_rounds = dict(run_config), num_rounds
        self.evaluation, self.eval_every, self.inference_scaling = evaluation, eval_every, inference_scaling
        self.label = strategy.label
        self.tracker = tracker
        self.target_accuracy = target_accuracy or None
        self.private, self.secret_sample = dp != "none", bool(secret_sample)
        self.target_reached_round: int | None = None
        self.stopped_by: str | None = None
        self.resumed: Checkpoint | None = open_run_directory(self.run_dir, self.run_config, resume)
        self.completed_rounds = self.resumed.server_round if self.resumed else 0
        self.rows: list[dict] = list(self.resumed.metrics) if self.resumed else []
        strategy.resume_after(self.completed_rounds, self.rows[-1] if self.rows else None)
        self.widths_held: set[float] = _below_one(  # the evaluation's `widths`; on resume, from the rows kept
            r.get("global-width") for r in read_metrics(self.run_dir, NODES_FILE)) if self.resumed else set()
        self.grid: MeteredGrid | None = None
        self.arrays: ArrayRecord | None = None  # the global arrays after the last round seen
        self.seconds = 0.0
        self.round_started = time.perf_counter()
        self.round_seconds: list[float] = []  # wall time of each round of this start(), evaluation included

    # -- running -----------------------------------------------------------------------------
    def start(self, grid: Grid, initial_state: Mapping[str, torch.Tensor] | None = None,
              **start_kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the rounds left with ``strategy.start`` on a metered ``grid``, this recorder as its
        ``evaluate_fn``; return the final global state (:meth:`final_state`).

        ``initial_state`` is the model's ``state_dict`` (only its payload keys are sent; not
        needed when resuming: the checkpoint's arrays are used, :meth:`check_resumable` checks a model
        against them). ``start_kwargs`` go to ``Strategy.start`` (``train_config``, ``timeout``, ...).
        """
        if self.resumed:
            initial = ArrayRecord({k: torch.from_numpy(v) for k, v in self.resumed.arrays.items()})
            self.resumed.restore_rngs()
            log(INFO, "resist-fl: resuming after round %d", self.completed_rounds)
        elif initial_state is None:
            raise ValueError("initial_state: a new run needs the initial model's state_dict")
        else:
            payload = set(self.layout.payload_keys())
            if missing := sorted(payload - set(initial_state)):
                raise KeyError(f"initial_state lacks {len(missing)} of the layout's keys, e.g. {missing[:3]}")
            initial = ArrayRecord({k: v for k, v in initial_state.items() if k in payload})
        self.arrays = initial
        # the one place a run's grid is metered
        self.grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
        started = time.perf_counter()
        if self.num_rounds > self.completed_rounds:
            try:
                self.strategy.start(grid=self.grid, initial_arrays=initial, evaluate_fn=self,
                                    num_rounds=self.num_rounds - self.completed_rounds, **start_kwargs)
            except TargetReached:
                log(INFO, "resist-fl: target accuracy %.4f reached in round %d: the run stops here",
                    self.target_accuracy, self.target_reached_round)
                self.stopped_by = "target-accuracy"
            except RunStops as stop:
                log(INFO, "resist-fl: the run stops after round %d: %s",
                    self.rows[-1]["round"] if self.rows else 0, stop)
                self.stopped_by = str(stop)
        self.seconds = time.perf_counter() - started
        return self.final_state()

    def check_resumable(self, initial_state: Mapping[str, torch.Tensor]) -> None:
        """On resume, a ValueError naming the first key whose checkpoint shape differs from this run's model
        (``initial_state``): the model changed since the checkpoint. Nothing to check for a new run."""
        if not self.resumed:
            return
        arrays = self.resumed.arrays
        if wrong := sorted(k for k, v in arrays.items()
                           if k in initial_state and tuple(initial_state[k].shape) != tuple(v.shape)):
            raise ValueError(f"resume: the checkpoint's {wrong[0]} has shape {tuple(arrays[wrong[0]].shape)} but this "
                             f"run's model has {tuple(initial_state[wrong[0]].shape)} ({len(wrong)} keys differ); the "
                             "model changed since the checkpoint (a changed run config or data set)")

    def final_state(self) -> dict[str, torch.Tensor]:
        """The global model's state_dict after the last round (inference scales included).
        ``Result.arrays`` of ``Strategy.start`` stays empty when no round produced an update
        (e.g. every round had too few valid replies); this is the model either way."""
        if self.arrays is None:
            raise RuntimeError("final_state: the run has not started")
        return full_state(self.arrays, self.layout, self.scales())

    def finish(self, model_spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``model.pt`` (the final state_dict, with ``model_spec`` when given) and
        ``summary.json``; return the summary."""
        state = self.final_state()
        save_model(self.run_dir / MODEL_FILE, state, model_spec)
        payload = set(self.layout.payload_keys())
        summary = {"strategy": self.label, "rounds": self.rows[-1]["round"] if self.rows else 0,
                   "total-bytes": self.cumulative_bytes, "target-accuracy": self.target_accuracy,
                   "target-reached-round": self.target_reached_round, "stopped-by": self.stopped_by,
                   "seconds": self.seconds,
                   "parameters": int(sum(v.numel() for k, v in state.items() if k in payload)),
                   "final-accuracy": self.rows[-1].get("accuracy") if self.rows else None}
        for key in ("epsilon", "epsilon-every-round", "dp-delta"):
            if self.rows and key in self.rows[-1]:
                summary[key] = self.rows[-1][key]
        write_json(self.run_dir / SUMMARY_FILE, summary)
        if self.tracker is not None:
            self.tracker.close()
        log(INFO, "resist-fl: done; %.2f MB communicated in %d rounds; results in %s",
            self.cumulative_bytes / 1e6, self.num_rounds, self.run_dir)
        return summary

    # -- state -------------------------------------------------------------------------------
    @property
    def cumulative_bytes(self) -> int:
        return self.rows[-1]["cumulative-bytes"] if self.rows else 0

    def scales(self) -> dict[str, float]:
        """Residual scales for evaluation: ResIST's inference scales (none when disabled or FedAvg)."""
        return self.strategy.inference_scales() if self.inference_scaling else {}

    # -- evaluate_fn -------------------------------------------------------------------------
    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.arrays = arrays
        if server_round == 0:
            self.round_started = time.perf_counter()
            return None
        if self.grid is None:
            raise RuntimeError("RoundRecorder is the evaluate_fn of RoundRecorder.start, not of another start()")
        run_round = self.completed_rounds + server_round
        traffic = self.grid.take_round()
        report = self.strategy.round_report()
        self.widths_held |= _below_one(n.global_width for n in report.nodes.values())
        row = self._round_row(run_round, traffic, report)
        nodes = self.node_rows(run_round, traffic, report)
        evaluated: dict[str, float | int | None] = {}
        if self.evaluation is not None and (run_round % self.eval_every == 0 or run_round == self.num_rounds):
            started = time.perf_counter()
            evaluated = _numbers(self.evaluation(run_round, self.final_state(), frozenset(self.widths_held)))
            row.update(evaluated)
            row["eval-seconds"] = time.perf_counter() - started  # the server's evaluation of the global model
        reason = divergence_reason((r.get("train-loss") for r in self.rows), row.get("train-loss"),
                                   row.get("replies-non-finite", 0))
        row["diverging"] = int(reason is not None)
        if reason:
            log(WARNING, "[round %d] the run may be diverging: %s. %s", run_round, reason, DIVERGENCE_HINT)
        row["server-rss-mb"] = resident_memory_mb()  # after the round's evaluation
        self.rows.append(row)
        # nodes.jsonl before the checkpoint, metrics.jsonl after it: a stop between any two leaves files a restart
        # mends (a resume cuts nodes.jsonl back to the checkpoint's round and rewrites metrics.jsonl from it; a new
        # start after a first round without a checkpoint drops its node rows), so the node rows, and the widths
        # the evaluation reads from them, of every round kept are there once
        append_metrics(self.run_dir, *nodes, name=NODES_FILE)
        rng_python, rng_torch = capture_rngs()
        Checkpoint(run_round, {k: v.numpy() for k, v in arrays.items()}, self.run_config,
                   self.rows, rng_python, rng_torch).save(self.run_dir)
        append_metrics(self.run_dir, row)
        if self.tracker is not None:
            self.tracker.log_row(row, run_round)
        acc, loss = (("-" if row.get(k) is None else f"{row[k]:.4f}") for k in ("accuracy", "train-loss"))
        self.round_seconds.append(time.perf_counter() - self.round_started)  # evaluation included
        log(INFO, "[round %d/%d] %s acc=%s train-loss=%s down=%.2f MB up=%.2f MB (%.1f s, ETA %s)", run_round,
            self.num_rounds, self.label, acc, loss, row["bytes-down"] / 1e6, row["bytes-up"] / 1e6,
            row["round-seconds"], eta(self.round_seconds, self.num_rounds - run_round))
        self.round_started = time.perf_counter()
        if self.target_accuracy and (row.get("accuracy") or 0.0) >= self.target_accuracy:
            self.target_reached_round = run_round
            raise TargetReached(run_round)  # after this round's row, nodes row and checkpoint
        finite = {k: v for k, v in evaluated.items() if v is not None}
        return MetricRecord(finite) if finite else None

    def _round_row(self, run_round: int, traffic: RoundTraffic, report: RoundReport) -> dict:
        """Traffic and client figures of the round that just ended (no evaluation yet)."""
        trained = report.metrics  # accepted replies only
        row = {
            "round": run_round, "strategy": self.label, "accuracy": None, "loss": None,
            "train-loss": trained.get("train-loss"), "client-seconds": trained.get("client-seconds", 0.0),
            "bytes-down": traffic.total_down, "bytes-up": traffic.total_up,
            "cumulative-bytes": self.cumulative_bytes + traffic.total_down + traffic.total_up,
            "round-seconds": time.perf_counter() - self.round_started,
            "nodes": len(traffic.train_nodes),
        }
        row.update({k: v for k, v in trained.items()
                    if k.startswith("replies-") or k in ("num-subnetworks", "merge-refused", "withheld-keys",
                                                           "withheld-blocks", "skipped-over-budget")})
        if report.client_evaluation:
            row["client-eval-loss"] = report.client_evaluation["eval-loss"]
            row["client-eval-acc"] = report.client_evaluation["eval-acc"]
        if report.phase is not None:
            row["phase"] = report.phase
        row.update(report.privacy)
        if self.private:  # no noise covers these: not written under DP
            for key in PRIVATE_DROPPED:
                row.pop(key, None)
        if report.held_fraction is not None:
            row["inference-scale"] = next(iter(self.scales().values()), 1.0)
            row["held-fraction"] = report.held_fraction
        return row

    def node_rows(self, run_round: int, traffic: RoundTraffic, report: RoundReport) -> list[dict]:
        """One ``nodes.jsonl`` row per node sent a training message this round."""
        if self.secret_sample:  # a secret sample: who took part is published nowhere
            return []
        sampler, partitionable = self.strategy.sampler, len(self.layout.partitionable)
        rows = []
        for node in sorted(traffic.train_nodes, key=sampler.rank):
            sent = report.nodes.get(node, NodeReport(None))
            reply = sent.reply
            capacity = sampler.capacity(node)
            blocks = partitionable if sent.blocks is None else sent.blocks
            limit = max_depth(capacity, partitionable) if sent.max_blocks is None else sent.max_blocks
            over = blocks > limit if sent.over_capacity is None else sent.over_capacity
            rows.append({
                "round": run_round, "strategy": self.label, "node": node,
                "partition": sampler.partition(node), "capacity": capacity,
                "max-blocks": limit, "blocks": blocks, "over-capacity": int(over), "budget-used": sent.budget_used,
                "flops-per-sample": sent.flops_per_sample, "params": sent.params, "width-rate": sent.width_rate,
                "global-width": sent.global_width,
                "bytes-down": traffic.bytes_down.get(node, 0), "bytes-up": traffic.bytes_up.get(node, 0),
                "status": "accepted" if reply else "no-valid-reply",
                "train-seconds": reply.get("train-seconds"), "simulated-seconds": reply.get("simulated-seconds"),
                "local-steps": reply.get("local-steps"), "peak-memory-mb": reply.get("peak-memory-mb"),
                "memory-measure": MEASURES.get(int(reply.get("memory-measure", 0))),
                "precision": PRECISIONS.get(reply.get("bf16")),
                "blocks-per-second": sent.blocks_per_second,
                "min-holders": sent.min_holders, "exposed-fraction": sent.exposed_fraction,
                "dp-epsilon": reply.get("dp-epsilon"), "device-cache-mb": reply.get("device-cache-mb"),
                "epsilon": sent.epsilon,
            })
            if self.private:  # no noise covers these: not written under DP
                for key in PRIVATE_DROPPED:
                    rows[-1].pop(key, None)
        return rows


def _below_one(widths: Iterable[float | None]) -> set[float]:
    """The shares of the global model's channels below 1 among ``widths`` (None: a node held all of them)."""
    return {float(w) for w in widths if w is not None and w < 1}


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
    """An evaluation's metrics, checked: string names, real-number values (a metrics row holds
    scalars only); a non-finite value is recorded as ``null`` (JSON has no NaN)."""
    out: dict[str, float | int | None] = {}
    for name, value in dict(metrics or {}).items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"evaluation returned {name!r}: {value!r}; expected a mapping of names to numbers")
        if isinstance(value, numbers.Integral):
            out[name] = int(value)
        else:
            out[name] = float(value) if math.isfinite(value) else None
    return out
