"""The ServerApp: run config -> model -> strategy (ResIST or FedAvg) -> results on disk."""

from __future__ import annotations

import random
import time
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from resist_fl.communication import MeteredGrid
from resist_fl.data import load_test_set, make_eval_loader
from resist_fl.decomposition import BlockLayout, scale_key
from resist_fl.model import ModelSpec, build_model
from resist_fl.outputs import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE, append_metrics, run_directory, save_model, write_json
from resist_fl.settings import RunSettings, resolve_model
from resist_fl.strategy import ResIST
from resist_fl.training import evaluate, resolve_device

app = ServerApp()


def build_strategy(settings: RunSettings, layout: BlockLayout) -> ResIST | FedAvg:
    """ResIST, or Flower's own FedAvg with the same sampling settings."""
    if settings.strategy == "resist":
        return ResIST(layout, fraction_train=settings.fraction_train,
                      min_train_nodes=settings.min_train_nodes,
                      min_available_nodes=settings.min_available_nodes,
                      min_blocks_per_site=settings.min_blocks_per_site, weighting=settings.weighting,
                      min_train_replies=settings.min_train_replies,
                      max_num_examples=settings.max_num_examples, seed=settings.seed)
    return FedAvg(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                  min_train_nodes=settings.min_train_nodes,
                  min_evaluate_nodes=settings.min_train_nodes if settings.fraction_evaluate else 0,
                  min_available_nodes=settings.min_available_nodes)


def train_config(settings: RunSettings) -> ConfigRecord:
    """Hyper-parameters every train message carries (both strategies)."""
    return ConfigRecord({
        "lr": settings.lr, "lr-schedule": settings.lr_schedule,
        "num-server-rounds": settings.num_server_rounds, "momentum": settings.momentum,
        "weight-decay": settings.weight_decay, "local-steps": settings.local_steps,
        "local-epochs": settings.local_epochs, "batch-size": settings.batch_size,
    })


def full_state(arrays: ArrayRecord, layout: BlockLayout, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """The global model's state_dict: trained arrays plus every block's residual scale."""
    state = arrays.to_torch_state_dict()
    for key in layout.keys:
        if key not in state:  # scale buffers: 1.0 unless partitioned (then the inference scale)
            block = key.rsplit(".", 1)[0]
            state[key] = torch.tensor(float(scales.get(block, 1.0)))
            assert scale_key(block) == key, key
    return {k: state[k] for k in layout.keys}


class RoundRecorder:
    """Evaluates the global model after each round and appends a ``metrics.jsonl`` row."""

    def __init__(self, settings: RunSettings, spec: ModelSpec, layout: BlockLayout,
                 strategy: ResIST | FedAvg, grid: MeteredGrid, run_dir) -> None:
        self.settings, self.spec, self.layout = settings, spec, layout
        self.strategy, self.grid, self.run_dir = strategy, grid, run_dir
        self.device = resolve_device(settings.device)
        test = load_test_set(settings.dataset, settings.data_path)
        self.test_loader = make_eval_loader(test, settings.dataset, settings.eval_batch_size)
        self.cumulative_bytes = 0
        self.round_started = time.perf_counter()

    def scales(self) -> dict[str, float]:
        return self.strategy.inference_scales() if isinstance(self.strategy, ResIST) else {}

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        model = build_model(self.spec)
        model.load_state_dict(full_state(arrays, self.layout, self.scales()))
        return evaluate(model, self.test_loader, self.device, self.settings.amp)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` of ``Strategy.start``: called for round 0 and after every round."""
        if server_round == 0:
            self.round_started = time.perf_counter()
            return None
        round_seconds = time.perf_counter() - self.round_started
        traffic = self.grid.take_round()
        self.cumulative_bytes += traffic.total_down + traffic.total_up
        losses, examples = traffic.client_metric("train-loss"), traffic.client_metric("num-examples")
        row = {
            "round": server_round, "strategy": self.settings.strategy,
            "accuracy": None, "loss": None,
            "train-loss": float(np.average(losses, weights=examples)) if losses and len(losses) == len(examples) else None,
            "bytes-down": traffic.total_down, "bytes-up": traffic.total_up,
            "cumulative-bytes": self.cumulative_bytes,
            "round-seconds": round_seconds,
            "client-seconds": sum(traffic.client_metric("train-seconds")),
            "nodes": len(traffic.bytes_down),
        }
        if isinstance(self.strategy, ResIST):
            row["inference-scale"] = next(iter(self.scales().values()))
        if server_round % self.settings.eval_every == 0 or server_round == self.settings.num_server_rounds:
            row["loss"], row["accuracy"] = self.evaluate(arrays)
        append_metrics(self.run_dir, row)
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        log(INFO, "[round %d] %s acc=%s train-loss=%s down=%.2f MB up=%.2f MB (%.1f s)", server_round,
            self.settings.strategy, acc, row["train-loss"], traffic.total_down / 1e6, traffic.total_up / 1e6,
            round_seconds)
        self.round_started = time.perf_counter()
        if row["accuracy"] is None:
            return None
        return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ResIST or FedAvg as the run config says; write everything under the run directory."""
    settings = RunSettings.from_run_config(context.run_config)
    spec, layout = resolve_model(settings)
    run_dir = run_directory(settings.output_dir, settings.run_name, settings.strategy)
    run_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "resist-fl: writing results to %s", run_dir)
    write_json(run_dir / CONFIG_FILE, {"run_config": settings.to_run_config(), "model_spec": spec.to_dict()})

    random.seed(settings.seed)  # FedAvg samples nodes with the global `random`
    torch.manual_seed(settings.seed)
    model = build_model(spec)
    payload = set(layout.payload_keys())
    initial = ArrayRecord({k: v for k, v in model.state_dict().items() if k in payload})

    strategy = build_strategy(settings, layout)
    metered = MeteredGrid(grid)
    recorder = RoundRecorder(settings, spec, layout, strategy, metered, run_dir)
    started = time.perf_counter()
    result = strategy.start(grid=metered, initial_arrays=initial, num_rounds=settings.num_server_rounds,
                            timeout=settings.round_timeout, train_config=train_config(settings),
                            evaluate_fn=recorder)
    state = full_state(result.arrays, layout, recorder.scales())
    save_model(run_dir / MODEL_FILE, state, spec.to_dict())
    summary = {"strategy": settings.strategy, "rounds": settings.num_server_rounds,
               "total-bytes": recorder.cumulative_bytes, "seconds": time.perf_counter() - started,
               "parameters": int(sum(v.numel() for k, v in state.items() if k in payload))}
    write_json(run_dir / SUMMARY_FILE, summary)
    log(INFO, "resist-fl: done; %.2f MB communicated in %d rounds; results in %s",
        recorder.cumulative_bytes / 1e6, settings.num_server_rounds, run_dir)
