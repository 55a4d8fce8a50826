"""The ServerApp: run config -> model -> strategy (ResIST or FedAvg) -> results on disk."""

from __future__ import annotations

import os
import random
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from resist_fl.core.allocation import max_depth
from resist_fl.core.decomposition import BlockLayout, scale_key
from resist_fl.core.model import ModelSpec, build_model, set_residual_scales
from resist_fl.data import DataError, load_test_set, make_eval_loader, normalization
from resist_fl.data.batches import EvalBatches
from resist_fl.flower.fedavg import ScreenedFedAvg
from resist_fl.flower.metering import MeteredGrid, RoundTraffic
from resist_fl.flower.resist import ResIST
from resist_fl.peak_memory import MEASURES
from resist_fl.run.checkpoint import CHECKPOINT_FILE, Checkpoint, capture_rngs, check_same_run
from resist_fl.run.divergence import DIVERGENCE_HINT, divergence_reason
from resist_fl.run.outputs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NODES_FILE,
    SUMMARY_FILE,
    append_metrics,
    read_metrics,
    rewrite_metrics,
    run_directory,
    save_model,
    write_json,
)
from resist_fl.run.settings import RunSettings, SettingsError, resolve_model
from resist_fl.training import evaluate, resolve_device

app = ServerApp()


def build_strategy(settings: RunSettings, layout: BlockLayout, round_offset: int = 0) -> ResIST | ScreenedFedAvg:
    """ResIST, or Flower's own FedAvg (behind the same reply screening) with the same sampling."""
    if settings.strategy == "resist":
        return ResIST(layout, fraction_train=settings.fraction_train,
                      min_train_nodes=settings.min_train_nodes,
                      min_available_nodes=settings.min_available_nodes,
                      min_blocks_per_site=settings.min_blocks_per_site, weighting=settings.weighting,
                      min_train_replies=settings.min_train_replies,
                      max_num_examples=settings.max_num_examples, seed=settings.seed,
                      round_offset=round_offset, server_lr=settings.server_lr,
                      transport=settings.transport_dtype, allocation=settings.allocation)
    return ScreenedFedAvg(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                          min_train_nodes=settings.min_train_nodes,
                          min_evaluate_nodes=settings.min_train_nodes if settings.fraction_evaluate else 0,
                          min_available_nodes=settings.min_available_nodes,
                          min_train_replies=settings.min_train_replies,
                          max_num_examples=settings.max_num_examples, seed=settings.seed,
                          round_offset=round_offset, server_lr=settings.server_lr,
                          transport=settings.transport_dtype)


def train_config(settings: RunSettings, spec: ModelSpec, round_offset: int) -> ConfigRecord:
    """What every train message carries (both strategies): the model's data shape (so a node
    with its own data set needs no server file), the hyper-parameters and the round offset."""
    return ConfigRecord({
        "num-classes": spec.num_classes, "in-channels": spec.in_channels, "round-offset": round_offset,
        "lr": settings.lr, "lr-schedule": settings.lr_schedule,
        "num-server-rounds": settings.num_server_rounds, "momentum": settings.momentum,
        "weight-decay": settings.weight_decay, "local-steps": settings.local_steps,
        "local-epochs": settings.local_epochs, "batch-size": settings.batch_size,
        "clip-grad-norm": settings.clip_grad_norm, "transport-dtype": settings.transport_dtype,
    })


def full_state(arrays: ArrayRecord, layout: BlockLayout, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """The global model's state_dict: trained arrays plus every block's residual scale."""
    state = arrays.to_torch_state_dict()
    for key in layout.keys:
        if key not in state:  # scale buffers: 1.0 unless partitioned (then the inference scale)
            block = key.rsplit(".", 1)[0]
            if scale_key(block) != key:
                raise KeyError(f"the global arrays lack {key!r}")
            state[key] = torch.tensor(float(scales.get(block, 1.0)))
    return {k: state[k] for k in layout.keys}


class RoundRecorder:
    """``evaluate_fn`` of ``Strategy.start``: after each round it evaluates the global model,
    appends a ``metrics.jsonl`` row and writes the checkpoint."""

    def __init__(self, settings: RunSettings, spec: ModelSpec, layout: BlockLayout,
                 strategy: ResIST | ScreenedFedAvg, grid: MeteredGrid, run_dir: Path,
                 test_loader: EvalBatches, resumed: Checkpoint | None = None) -> None:
        self.settings, self.spec, self.layout = settings, spec, layout
        self.strategy, self.grid, self.run_dir = strategy, grid, run_dir
        self.device = resolve_device(settings.device)
        self.test_loader = test_loader
        self.model = build_model(spec)  # built once, loaded with the global state at each evaluation
        self.rows: list[dict] = list(resumed.metrics) if resumed else []
        self.round_offset = resumed.server_round if resumed else 0
        self.arrays: ArrayRecord | None = None  # the global arrays after the last round seen
        self.round_started = time.perf_counter()
        self.truncated: dict[int, torch.nn.Module] = {}  # any-depth evaluation models, by percent

    @property
    def cumulative_bytes(self) -> int:
        return self.rows[-1]["cumulative-bytes"] if self.rows else 0

    def scales(self) -> dict[str, float]:
        """Residual scales for evaluation: ResIST's inference scales (1.0 when disabled or FedAvg)."""
        if isinstance(self.strategy, ResIST) and self.settings.inference_scaling:
            return self.strategy.inference_scales()
        return {}

    def evaluate(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Loss and accuracy of the full model with ``state`` (:func:`full_state`)."""
        self.model.load_state_dict(state)
        return evaluate(self.model, self.test_loader, self.device, self.settings.amp)

    def evaluate_truncated(self, state: dict[str, torch.Tensor], percent: int) -> float:
        """Accuracy of the global model keeping only the first ``percent`` % of the partitionable
        blocks (at least one): what a device that keeps part of the model gets. Its blocks are
        scaled as a sub-network of the trained depth would be: ``min(1, s * P / k)`` for k kept of
        P blocks and full-model scale s (so 100 % is the full model exactly)."""
        blocks = self.layout.partitionable
        kept = blocks[:max(1, round(len(blocks) * percent / 100))]
        if percent not in self.truncated:
            self.truncated[percent] = self.layout.build_subnetwork(self.spec, kept)
        model = self.truncated[percent]
        full_scale = next(iter(self.scales().values()), 1.0)
        model.load_state_dict({k: state[k] for k in self.layout.subnetwork_keys(kept)})
        set_residual_scales(model, {b: min(1.0, full_scale * len(blocks) / len(kept)) for b in kept})
        return evaluate(model, self.test_loader, self.device, self.settings.amp)[1]

    def node_rows(self, run_round: int, traffic: RoundTraffic) -> list[dict]:
        """One ``nodes.jsonl`` row per node sent a training message this round."""
        sampler, partitionable = self.strategy.sampler, len(self.layout.partitionable)
        sent_blocks = self.strategy.last_blocks if isinstance(self.strategy, ResIST) else {}
        rows = []
        for node in sorted(traffic.train_nodes, key=sampler.rank):
            reply = self.strategy.last_replies.get(node, {})
            capacity = sampler.capacity(node)
            blocks = len(sent_blocks[node]) if node in sent_blocks else partitionable
            rows.append({
                "round": run_round, "strategy": self.settings.strategy, "node": node,
                "partition": sampler.partition(node), "capacity": capacity,
                "max-blocks": max_depth(capacity, partitionable), "blocks": blocks,
                "over-capacity": int(blocks > max_depth(capacity, partitionable)),
                "bytes-down": traffic.bytes_down.get(node, 0), "bytes-up": traffic.bytes_up.get(node, 0),
                "status": "accepted" if reply else "no-valid-reply",
                "train-seconds": reply.get("train-seconds"), "simulated-seconds": reply.get("simulated-seconds"),
                "peak-memory-mb": reply.get("peak-memory-mb"),
                "memory-measure": MEASURES.get(int(reply.get("memory-measure", 0))),
            })
        return rows

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.arrays = arrays
        if server_round == 0:
            self.round_started = time.perf_counter()
            return None
        run_round = self.round_offset + server_round
        traffic = self.grid.take_round()
        row = self._round_row(run_round, traffic)
        nodes = self.node_rows(run_round, traffic)
        if run_round % self.settings.eval_every == 0 or run_round == self.settings.num_server_rounds:
            state = full_state(arrays, self.layout, self.scales())  # once per evaluated round
            row["loss"], row["accuracy"] = self.evaluate(state)
            for percent in self.settings.depth_percents():
                row[f"accuracy-depth-{percent}"] = self.evaluate_truncated(state, percent)
        reason = divergence_reason((r.get("train-loss") for r in self.rows), row["train-loss"],
                                   row.get("replies-non-finite", 0))
        row["diverging"] = int(reason is not None)
        if reason:
            log(WARNING, "[round %d] the run may be diverging: %s. %s", run_round, reason, DIVERGENCE_HINT)
        row["server-rss-mb"] = resident_memory_mb()  # after the round's evaluation
        self.rows.append(row)
        rng_python, rng_torch = capture_rngs()
        Checkpoint(run_round, {k: v.numpy() for k, v in arrays.items()}, self.settings.to_run_config(),
                   self.rows, rng_python, rng_torch).save(self.run_dir)
        append_metrics(self.run_dir, row)
        append_metrics(self.run_dir, *nodes, name=NODES_FILE)
        acc, loss = (("-" if row[k] is None else f"{row[k]:.4f}") for k in ("accuracy", "train-loss"))
        log(INFO, "[round %d] %s acc=%s train-loss=%s down=%.2f MB up=%.2f MB (%.1f s)", run_round,
            self.settings.strategy, acc, loss, row["bytes-down"] / 1e6, row["bytes-up"] / 1e6,
            row["round-seconds"])
        self.round_started = time.perf_counter()
        if row["accuracy"] is None:
            return None
        return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})

    def _round_row(self, run_round: int, traffic: RoundTraffic) -> dict:
        """Traffic and client figures of the round that just ended (no evaluation yet)."""
        trained = self.strategy.last_round_metrics  # accepted replies only
        row = {
            "round": run_round, "strategy": self.settings.strategy, "accuracy": None, "loss": None,
            "train-loss": trained.get("train-loss"), "client-seconds": trained.get("client-seconds", 0.0),
            "bytes-down": traffic.total_down, "bytes-up": traffic.total_up,
            "cumulative-bytes": self.cumulative_bytes + traffic.total_down + traffic.total_up,
            "round-seconds": time.perf_counter() - self.round_started,
            "nodes": len(traffic.train_nodes),
        }
        row.update({k: v for k, v in trained.items()
                    if k.startswith("replies-") or k in ("num-subnetworks", "merge-refused")})
        if isinstance(self.strategy, ScreenedFedAvg) and self.strategy.last_evaluate_metrics:
            row["client-eval-loss"] = self.strategy.last_evaluate_metrics["eval-loss"]
            row["client-eval-acc"] = self.strategy.last_evaluate_metrics["eval-acc"]
            self.strategy.last_evaluate_metrics = {}
        if isinstance(self.strategy, ResIST):
            row["inference-scale"] = next(iter(self.scales().values()), 1.0)
            row["held-fraction"] = self.strategy.held_fraction
        return row


def resident_memory_mb() -> float | None:
    """This process's resident memory (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def prepare_data(settings: RunSettings) -> tuple[ModelSpec, BlockLayout, EvalBatches, dict]:
    """Model spec and layout (classes and channels from the data), the central test loader, and
    what the data pipeline chose (logged, and recorded in ``run_config.json``).

    A data set that cannot be loaded stops the run here, before round 1 and before a run
    directory exists, with the reason and what to do as the last lines the app logs.
    """
    try:
        spec, layout = resolve_model(settings)
        test = load_test_set(settings.dataset, settings.data_path)
        stats = normalization(settings.dataset, settings.data_path)
    except DataError as err:
        log(ERROR, "resist-fl: the data set cannot be used:\n    %s", err)
        raise DataError(str(err)) from None
    data = {"dataset": settings.dataset, "augment": settings.augmentation(),
            "image-shape": list(test.images.shape[1:]), "test-size": len(test),
            "normalization": {"mean": list(stats.mean), "std": list(stats.std)}}
    log(INFO, "resist-fl: data %s, images %s, augment=%s (%s), normalisation mean %s std %s",
        settings.dataset, "x".join(map(str, data["image-shape"])), data["augment"], settings.augment,
        [round(m, 4) for m in stats.mean], [round(s, 4) for s in stats.std])
    loader = make_eval_loader(test, settings.eval_batch_size, normalization=stats,
                              device=resolve_device(settings.device))
    return spec, layout, loader, data


def prepare_run_dir(settings: RunSettings) -> tuple[Path, Checkpoint | None]:
    """The run directory, and the checkpoint to continue from when ``resume`` is set.

    A new run refuses a directory that already holds results, so nothing is
    overwritten; a resumed run rewrites ``metrics.jsonl`` from the checkpoint.
    """
    run_dir = run_directory(settings.output_dir, settings.run_name, settings.strategy)
    if not settings.resume:
        if (run_dir / METRICS_FILE).exists() or (run_dir / CHECKPOINT_FILE).exists():
            raise FileExistsError(f"{run_dir} already holds a run; set resume=true to continue it, "
                                  "or choose another run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, None
    if not settings.run_name:
        raise SettingsError("resume = true needs run-name: the name of the run directory to continue")
    checkpoint = Checkpoint.load(run_dir)
    check_same_run(checkpoint.run_config, settings.to_run_config())
    rewrite_metrics(run_dir, checkpoint.metrics)
    done = checkpoint.server_round
    rewrite_metrics(run_dir, [r for r in read_metrics(run_dir, NODES_FILE) if r["round"] <= done], NODES_FILE)
    return run_dir, checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ResIST or FedAvg as the run config says; write everything under the run directory."""
    settings = RunSettings.from_run_config(context.run_config)
    spec, layout, test_loader, data = prepare_data(settings)
    run_dir, resumed = prepare_run_dir(settings)
    log(INFO, "resist-fl: writing results to %s", run_dir)
    write_json(run_dir / CONFIG_FILE, {"run_config": settings.to_run_config(), "model_spec": spec.to_dict(),
                                       "data": data})

    random.seed(settings.seed)  # Flower's FedAvg samples evaluation nodes with the global `random`
    torch.manual_seed(settings.seed)
    payload = set(layout.payload_keys())
    if resumed:
        initial = ArrayRecord({k: torch.from_numpy(v) for k, v in resumed.arrays.items()})
        resumed.restore_rngs()
        log(INFO, "resist-fl: resuming after round %d", resumed.server_round)
    else:
        initial = ArrayRecord({k: v for k, v in build_model(spec).state_dict().items() if k in payload})
    offset = resumed.server_round if resumed else 0

    strategy = build_strategy(settings, layout, round_offset=offset)
    if resumed and isinstance(strategy, ResIST) and resumed.metrics:
        strategy.num_subnetworks = int(resumed.metrics[-1]["num-subnetworks"])  # for the inference scale
        strategy.held_fraction = resumed.metrics[-1].get("held-fraction")
    metered = MeteredGrid(grid)
    recorder = RoundRecorder(settings, spec, layout, strategy, metered, run_dir, test_loader, resumed)
    config = train_config(settings, spec, offset)
    started = time.perf_counter()
    if settings.num_server_rounds > offset:
        # The global arrays are taken from the recorder: `Result.arrays` stays empty when no
        # round produced an update (e.g. every round had too few valid replies).
        strategy.start(grid=metered, initial_arrays=initial, num_rounds=settings.num_server_rounds - offset,
                       timeout=settings.round_timeout, train_config=config,
                       evaluate_config=ConfigRecord({k: config[k] for k in ("num-classes", "in-channels")}),
                       evaluate_fn=recorder)
    state = full_state(recorder.arrays or initial, layout, recorder.scales())
    save_model(run_dir / MODEL_FILE, state, spec.to_dict())
    summary = {"strategy": settings.strategy, "rounds": settings.num_server_rounds,
               "total-bytes": recorder.cumulative_bytes, "seconds": time.perf_counter() - started,
               "parameters": int(sum(v.numel() for k, v in state.items() if k in payload)),
               "final-accuracy": recorder.rows[-1]["accuracy"] if recorder.rows else None}
    write_json(run_dir / SUMMARY_FILE, summary)
    log(INFO, "resist-fl: done; %.2f MB communicated in %d rounds; results in %s",
        recorder.cumulative_bytes / 1e6, settings.num_server_rounds, run_dir)
