"""The ClientApp: message -> (sub-)network -> local SGD -> reply with the same keys.

Its hyper-parameters come from one place, the run config every node receives
(``context.run_config`` -> :class:`RunSettings`); the message carries only what the strategy
knows (blocks, transport, run round) and the data shape the server's data set gives
(``num-classes``, ``in-channels``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import nullcontext
from functools import lru_cache
from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from resist_fl.core.allocation import check_capacity
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import ModelSpec
from resist_fl.core.validation import EVALUATE_METRICS
from resist_fl.data import DataError, EvalBatches, TrainBatches, load_partition, load_test_set, normalization
from resist_fl.data.batches import DeviceImages
from resist_fl.data.partition_cache import cached_partition, partition_key
from resist_fl.flower.client_side import (
    ContextMemory,
    identity_reply,
    load_received,
    message_blocks,
    message_run_round,
    message_transport,
    train_reply,
)
from resist_fl.flower.straggler_mod import simulated_straggler
from resist_fl.node.device_cache import DeviceCache
from resist_fl.node.dp_ledger import ledger_path, partition_lock, read_history, write_history
from resist_fl.node.dp_budget import NodeBudget, spent_history
from resist_fl.node.local_dp import sample_rate, train_private
from resist_fl.node.method_hooks import SubNetwork
from resist_fl.node.peak_memory import PeakMemory
from resist_fl.node.precision import explain, uses_bf16
from resist_fl.node.training import evaluate, resolve_device, scheduled_lr, steps_for, train
from resist_fl.run.methods import load, method
from resist_fl.run.settings import RunSettings, profile_value

app = ClientApp(mods=[simulated_straggler])  # slowdown-profile: a simulated straggler sleeps after training


_DEVICE_CACHES: dict[tuple[str, int], DeviceCache] = {}  # (device, bound) -> this process's decoded partitions


def _device_cache(device: torch.device, max_mb: int) -> DeviceCache:
    key = (str(device), int(max_mb))
    if key not in _DEVICE_CACHES:
        _DEVICE_CACHES[key] = DeviceCache(device, int(max_mb) * 2**20)
    return _DEVICE_CACHES[key]


def _partition(dataset: str, data_path: str, partitioner: str, alpha: float, seed: int,
               partition_id: int, num_partitions: int, cache_dir: str, cache: DeviceCache,
               image_size: int = 224, shards_per_partition: int = 2, validation_size: int = 0) -> DeviceImages:
    """A node's training partition as uint8 tensors, kept for as long as the process lives (on
    the training device within ``device-cache-mb``, else in pinned host memory); decoded once
    per node (``partition-cache``), not once per process."""
    key = partition_key(dataset, data_path, partitioner=partitioner, alpha=float(alpha), seed=seed,
                        partition_id=partition_id, num_partitions=num_partitions,
                        **({"image-size": image_size} if dataset == "imagefolder" else {}),
                        **({"shards-per-partition": shards_per_partition} if partitioner == "shard" else {}),
                        **({"validation-size": validation_size} if validation_size else {}))
    return cache.get(key, lambda: cached_partition(cache_dir, key, lambda: load_partition(
        dataset, partition_id, num_partitions, partitioner=partitioner, alpha=alpha, seed=seed, data_path=data_path,
        image_size=image_size, shards_per_partition=shards_per_partition, validation_size=validation_size)))


@lru_cache(maxsize=8)
def _run(run_config: tuple, num_classes: int, in_channels: int) -> tuple[RunSettings, ModelSpec, BlockLayout]:
    """Settings, model spec and layout of a run; classes and channels come from the server."""
    settings = RunSettings.from_run_config(dict(run_config))
    spec = settings.model_spec(num_classes=num_classes, in_channels=in_channels)
    return settings, spec, BlockLayout.from_spec(spec, settings.stages())


def _run_of(context: Context, config: ConfigRecord) -> tuple[RunSettings, ModelSpec, BlockLayout]:
    return _run(tuple(sorted(context.run_config.items())), int(config["num-classes"]),
                int(config["in-channels"]))


def _data_path(context: Context, settings: RunSettings) -> str:
    """A node's own ``data-path`` (node config) wins over the run config's.

    Raises
    ------
    DataError
        A node's own file under ``validation-size``: the hold-out is drawn from the run's data set, which the
        server evaluates on; a node's own file has other images, so its held-out positions mean nothing there.
    """
    own = context.node_config.get("data-path")
    if own is not None and settings.validation_size:
        raise DataError(f"validation-size = {settings.validation_size} with this node's own data-path {own!r}: the "
                        "held-out images are drawn from the run's data set, which every node must then read; "
                        "expected validation-size = 0 (the default) or no data-path in the node config")
    return str(context.node_config.get("data-path", settings.data_path))


def _partition_cache(context: Context, settings: RunSettings) -> str:
    """A node's own ``partition-cache`` directory (node config) wins over the run config's."""
    return str(context.node_config.get("partition-cache", settings.partition_cache))


def build_local_model(settings: RunSettings, spec: ModelSpec, layout: BlockLayout,
                      msg: Message) -> torch.nn.Module:
    """The model the message's arrays belong to, as the run's method builds it (its node hook in the
    method table: a sub-network of ``blocks``, a width-sliced model, ...), loaded from the arrays
    (:func:`~resist_fl.flower.client_side.load_received`: keys checked, arrays decoded)."""
    model = node_hook(settings.strategy).build(spec, layout, msg.content["config"])
    return load_received(model, msg.content["arrays"], message_blocks(msg), message_transport(msg))


def partition_of(node: Mapping[str, object]) -> tuple[int, int]:
    """The node config's ``partition-id`` and ``num-partitions``, checked: ValueError naming a missing or bad
    value (a SuperNode started without them, or with an id outside ``[0, num-partitions)``)."""
    found = {key: node.get(key) for key in ("partition-id", "num-partitions")}
    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"node config {key} = {value!r}: expected an integer (flower-supernode --node-config "
                             "\"partition-id=0 num-partitions=4\")")
    partition_id, partitions = found["partition-id"], found["num-partitions"]
    if partitions < 1 or not 0 <= partition_id < partitions:
        raise ValueError(f"node config partition-id = {partition_id}, num-partitions = {partitions}: expected "
                         "num-partitions >= 1 and 0 <= partition-id < num-partitions")
    return partition_id, partitions


@lru_cache(maxsize=16)
def node_hook(strategy: str) -> SubNetwork:
    """What a node of the method ``strategy`` does differently (:mod:`resist_fl.node.method_hooks`)."""
    return load(method(strategy).node_hook)()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received (sub-)network on this node's partition for one round."""
    config = msg.content["config"]
    settings, spec, layout = _run_of(context, config)
    blocks = message_blocks(msg)
    model = build_local_model(settings, spec, layout, msg)

    node = context.node_config
    partition_id, num_partitions = partition_of(node)
    data_path = _data_path(context, settings)
    device = resolve_device(settings.device)
    cache = _device_cache(device, settings.device_cache_mb)
    partition = _partition(settings.dataset, data_path, settings.partitioner, settings.dirichlet_alpha,
                           settings.seed, partition_id, num_partitions,
                           _partition_cache(context, settings), cache, settings.image_size,
                           settings.shards_per_partition, settings.validation_size)
    if (top := int(partition.labels.max())) >= spec.num_classes:
        raise DataError(f"data-path {data_path!r}: partition {partition_id} has label {top}, but the run's "
                        f"model has {spec.num_classes} classes; expected labels in [0, {spec.num_classes})")
    if (channels := int(partition.images.shape[1])) != spec.in_channels:  # a node's own files, unlike the server's
        raise DataError(f"data-path {data_path!r}: partition {partition_id} has {channels}-channel images, but the "
                        f"run's model takes {spec.in_channels}; expected images with as many channels as the "
                        "server's data set")
    bf16 = uses_bf16(settings.amp_wanted(), device)  # amp='auto': this node's own device decides
    _announce_precision(device, settings.amp, settings.dp == "local")
    run_round = message_run_round(msg)
    round_seed = settings.seed * 100_003 + run_round * 1_009 + partition_id  # order, crops, flips, dropout
    loader = TrainBatches(partition, settings.batch_size,
                               normalization=normalization(settings.dataset, data_path, settings.image_size,
                                                           settings.validation_size),
                               augment=settings.augmentation(), seed=round_seed, crop_size=settings.crop_size(),
                               drop_last=device.type == "cuda")  # one batch shape on a GPU
    num_examples = len(partition)
    steps = steps_for(num_examples, settings.batch_size, settings.local_steps, settings.local_epochs)
    budget = NodeBudget.of(node)  # the node's own budget, which no run config loosens
    lr = scheduled_lr(settings.lr, settings.lr_schedule, run_round, settings.num_server_rounds)
    torch.manual_seed(round_seed)
    local = node_hook(settings.strategy).local_training(model, spec, config, round_seed, partition.labels,
                                                        ContextMemory(context.state))
    private = settings.dp != "none"
    # with a budget, the check, the training and the ledger's write hold the partition's lock: two runs cannot
    # both pass the check before either has written what it spent
    with PeakMemory(device) as peak, partition_lock(node) if budget is not None else nullcontext():
        if budget is not None:
            budget.check_train(settings.dp, spent_history(node),
                               (settings.dp_noise_multiplier, sample_rate(settings.batch_size, num_examples), steps))
        if settings.dp == "local":  # DP-SGD (Opacus); the accountant's history is the node's ledger on disk
            ledger = ledger_path(node, settings.run_name, context.run_id, context.node_id)
            trained = train_private(model, loader, steps=steps, lr=lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay, noise_multiplier=settings.dp_noise_multiplier,
                                    clip=settings.dp_clip, delta=settings.dp_delta, history=read_history(ledger))
            write_history(ledger, trained.history)
            result = trained.result
        else:
            result = train(model, loader, steps=steps, lr=lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay, device=device,
                           amp=bf16, clip_grad_norm=settings.clip_grad_norm, before_step=local.before_step,
                           loss_fn=local.loss)
    if local.after_training is not None:
        local.after_training()

    blocks_trained = len(blocks) if blocks is not None else len(layout.partitionable)
    if private:  # under DP nothing but the privatised update and data-independent figures leaves the node
        metrics = {"blocks": blocks_trained}
        if settings.dp == "local":
            metrics["dp-epsilon"] = trained.epsilon
    else:
        metrics = {"blocks": blocks_trained, "bf16": int(bf16), "peak-memory-mb": peak.megabytes,
                   "memory-measure": peak.measure, "device-cache-mb": cache.device_bytes / 2**20,
                   **local.reply_metrics}
    return train_reply(msg, model, num_examples=num_examples, train_loss=result.loss / local.loss_terms,
                       train_seconds=result.seconds, local_steps=result.steps, metrics=metrics,
                       private=private)


@lru_cache(maxsize=4)
def _announce_precision(device: torch.device, amp: bool | str, local_dp: bool) -> None:
    """Log once per process what this node trains in (``bf16 autocast`` or ``fp32``, and why), where,
    and with how many CPU threads (a simulation's Ray actor is given as many as ``client-resources-num-cpus``)."""
    log(INFO, "resist-fl node: training on %s in %s, %d torch CPU thread(s) (OMP_NUM_THREADS=%s)", device,
        explain(amp, device, local_dp), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset"))


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Federated evaluation (FedAvg with fraction-evaluate > 0) of the global model (at the width
    the message names: fedavg-small's).

    On the node's own test split when its node config names a ``data-path``,
    else on its share of the central test set (every ``num-partitions``-th
    image from ``partition-id``); under ``validation-size``, of the held-out training images.
    """
    node = context.node_config
    if (budget := NodeBudget.of(node)) is not None:
        budget.refuse_evaluate()
    config = msg.content["config"]
    settings, spec, layout = _run_of(context, config)
    model = build_local_model(settings, spec, layout, msg)  # fedavg-small: at the width the message names
    data_path = _data_path(context, settings)
    test = load_test_set(settings.dataset, data_path, settings.image_size, settings.validation_size)
    if "data-path" not in node:
        partition_id, num_partitions = partition_of(node)
        if partition_id >= len(test):
            raise DataError(f"node config partition-id = {partition_id}: its share of the {len(test)} evaluation "
                            f"images (every {num_partitions}-th from it) is empty; expected at most "
                            f"{len(test)} partitions")
        test = test.subset(np.arange(partition_id, len(test), num_partitions))
    device = resolve_device(settings.device)
    stats = normalization(settings.dataset, data_path, settings.image_size, settings.validation_size)
    loader = EvalBatches(test, settings.eval_batch_size, normalization=stats, device=device)
    loss, accuracy = evaluate(model, loader, device, uses_bf16(settings.amp_wanted(), device))
    metrics = MetricRecord(dict(zip(EVALUATE_METRICS, (len(test), loss, accuracy))))
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def identity_handler(msg: Message, context: Context) -> Message:
    """Tell the server this node's ``partition-id`` (for reproducible node sampling), its
    ``capacity`` (the node config's, else the run config's ``capacity-profile`` entry for the
    partition id, else 1.0) and, when it trains on the run's split of the data set (no node-config
    ``data-path``), ``num-partitions``."""
    node = context.node_config
    partition_id = node.get("partition-id")
    if not isinstance(partition_id, int) or isinstance(partition_id, bool):
        partition_id = None
    capacity = None
    if "capacity" in node:
        capacity = check_capacity(node["capacity"], "node config capacity")
    elif partition_id is not None:
        capacity = profile_value(RunSettings.from_run_config(dict(context.run_config)).capacities(), partition_id)
    num_partitions = node.get("num-partitions") if "data-path" not in node else None
    if not isinstance(num_partitions, int) or isinstance(num_partitions, bool):
        num_partitions = None
    return identity_reply(msg, partition_id, capacity, num_partitions)
