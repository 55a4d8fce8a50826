"""The ClientApp: message -> (sub-)network -> local SGD -> reply with the same keys."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from resist_fl.data import ImageArrays, load_partition, make_train_loader
from resist_fl.decomposition import BlockLayout, is_scale_key
from resist_fl.model import ModelSpec, build_model
from resist_fl.settings import RunSettings, resolve_model
from resist_fl.training import resolve_device, scheduled_lr, steps_for, train
from resist_fl.validation import TRAIN_METRICS

app = ClientApp()


@lru_cache(maxsize=8)
def _partition(dataset: str, data_path: str, partitioner: str, alpha: float, seed: int,
               partition_id: int, num_partitions: int) -> ImageArrays:
    """A node's training partition, cached per partition for as long as the process lives."""
    return load_partition(dataset, partition_id, num_partitions, partitioner=partitioner,
                          alpha=alpha, seed=seed, data_path=data_path)


@lru_cache(maxsize=8)
def _model_layout(run_config: tuple) -> tuple[RunSettings, ModelSpec, BlockLayout]:
    settings = RunSettings.from_run_config(dict(run_config))
    return (settings, *resolve_model(settings))


def build_local_model(spec: ModelSpec, layout: BlockLayout, arrays: ArrayRecord,
                      blocks: list[str] | None) -> torch.nn.Module:
    """The sub-network named by ``blocks`` (the full model when None), loaded from ``arrays``.

    The received keys must be exactly that sub-network's payload keys.
    """
    model = build_model(spec) if blocks is None else layout.build_subnetwork(spec, blocks)
    expected = set(layout.payload_keys(blocks))
    if set(arrays) != expected:
        raise ValueError(f"received keys do not match blocks {blocks}: "
                         f"{len(set(arrays) - expected)} unexpected, {len(expected - set(arrays))} missing")
    missing, unexpected = model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    assert not unexpected and all(is_scale_key(k) for k in missing), (missing, unexpected)
    return model


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received (sub-)network on this node's partition for one round."""
    settings, spec, layout = _model_layout(tuple(sorted(context.run_config.items())))
    config = msg.content["config"]
    arrays = msg.content["arrays"]
    blocks = list(config["blocks"]) if "blocks" in config else None
    model = build_local_model(spec, layout, arrays, blocks)

    node = context.node_config
    data_path = str(node.get("data-path", settings.data_path))
    partition = _partition(settings.dataset, data_path, settings.partitioner, settings.dirichlet_alpha,
                           settings.seed, int(node["partition-id"]), int(node["num-partitions"]))
    server_round = int(config["server-round"]) + int(config["round-offset"])
    batch_size = int(config["batch-size"])
    loader = make_train_loader(partition, settings.dataset, batch_size,
                               seed=settings.seed * 100_003 + server_round)
    num_examples = len(partition.labels)
    steps = steps_for(num_examples, batch_size, int(config["local-steps"]), int(config["local-epochs"]))
    lr = scheduled_lr(float(config["lr"]), str(config["lr-schedule"]), server_round,
                      int(config["num-server-rounds"]))
    torch.manual_seed(settings.seed * 100_003 + server_round * 1_009 + int(node["partition-id"]))
    result = train(model, loader, steps=steps, lr=lr, momentum=float(config["momentum"]),
                   weight_decay=float(config["weight-decay"]), device=resolve_device(settings.device),
                   amp=settings.amp)

    state = model.state_dict()
    reply_arrays = ArrayRecord({k: state[k].detach().cpu() for k in arrays})
    metrics = MetricRecord(dict(zip(TRAIN_METRICS, (num_examples, result.loss, result.seconds, result.steps))))
    return Message(RecordDict({"arrays": reply_arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Federated evaluation (FedAvg with fraction-evaluate > 0): the full model on the local partition."""
    from resist_fl.data import make_eval_loader
    from resist_fl.training import evaluate

    settings, spec, layout = _model_layout(tuple(sorted(context.run_config.items())))
    model = build_local_model(spec, layout, msg.content["arrays"], None)
    node = context.node_config
    partition = _partition(settings.dataset, str(node.get("data-path", settings.data_path)),
                           settings.partitioner, settings.dirichlet_alpha, settings.seed,
                           int(node["partition-id"]), int(node["num-partitions"]))
    loader = make_eval_loader(partition, settings.dataset, settings.eval_batch_size)
    loss, accuracy = evaluate(model, loader, resolve_device(settings.device), settings.amp)
    metrics = MetricRecord({"num-examples": len(partition.labels), "eval-loss": loss, "eval-acc": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
