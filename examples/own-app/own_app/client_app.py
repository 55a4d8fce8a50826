"""The app's own ClientApp: trains the sub-network of its own model that the server sent."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from own_app.task import STAGES, OwnResNet, example_batch, load_data, train
from resist_fl import BlockLayout
from resist_fl.flower.client_side import identity_reply, message_run_round, received_subnetwork, train_reply

app = ClientApp()


@lru_cache(maxsize=1)
def global_model() -> tuple[OwnResNet, BlockLayout]:
    """The global-shaped model (its weights are replaced by the received ones) and its layout."""
    model = OwnResNet()
    return model, BlockLayout.from_model(model, example_batch(), stages=STAGES)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    partition_id, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model = received_subnetwork(*global_model(), msg)  # this round's sub-network, loaded
    run_round = message_run_round(msg)  # stamped by the strategy (a resumed run continues its rounds)
    seed = int(config["seed"]) * 100_003 + run_round * 1_009 + partition_id
    torch.manual_seed(seed)
    data = load_data(partition_id, num_partitions)
    steps = int(config["local-steps"])
    loss, seconds = train(model, data, steps=steps, batch_size=int(config["batch-size"]), lr=float(config["lr"]),
                          seed=seed)
    return train_reply(msg, model, num_examples=len(data), train_loss=loss, train_seconds=seconds,
                       local_steps=steps)


@app.query()
def identity_handler(msg: Message, context: Context) -> Message:
    """Nodes are sampled in partition order: the same seed trains the same partitions every run."""
    return identity_reply(msg, partition_id=context.node_config.get("partition-id"))
