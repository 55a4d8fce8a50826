"""What a ClientApp needs to take part in a run of any of the project's strategies, for any model.

A training message carries the arrays of one sub-network (``arrays``) and, in its ``config``,
the names of the partitionable blocks that sub-network holds (``blocks``; absent for FedAvg,
which sends the full model), how float arrays travel (``transport-dtype``) and the run round
(``run-round``), all stamped by the strategy (:mod:`resist_fl.flower.message_keys`). A reply carries
the same keys back, trained, and the metrics :data:`~resist_fl.core.validation.TRAIN_METRICS`.
The project's ClientApp and ``examples/own-app`` both build on these helpers:

- :func:`received_subnetwork`: the user's model cut to the message's sub-network and loaded;
- :func:`load_received`: load a message's arrays into a model already cut (checked, decoded);
- :func:`train_reply`: the reply to a training message;
- :func:`identity_reply`: the answer to the node-identity query (partition id, capacity).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from resist_fl.core.allocation import check_capacity
from resist_fl.core.decomposition import BlockLayout, is_scale_key
from resist_fl.core.residual_nets import subnetwork_of
from resist_fl.core.transport import decode_state, encode_array
from resist_fl.core.validation import TRAIN_METRICS
from resist_fl.flower.array_codec import array_of, array_view
from resist_fl.flower.central_dp import BELOW_CLIP, below_clip, clip_update
from resist_fl.flower.message_keys import BLOCKS, DP_CLIP, DP_COUNT_BELOW, RUN_ROUND, SERVER_ROUND, TRANSPORT
from resist_fl.flower.node_sampling import IDENTITY_RECORD


class ContextMemory:
    """A node's memory across rounds (:class:`~resist_fl.node.method_hooks.NodeMemory`) in Flower's
    ``context.state``: each name an ``ArrayRecord``. It lives as long as the SuperNode does."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def load(self, name: str) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.state[name].items()} if name in self.state else {}

    def save(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.state[name] = ArrayRecord(array_dict={k: array_of(np.asarray(v)) for k, v in arrays.items()})


def message_blocks(message: Message) -> list[str] | None:
    """The partitionable blocks a training message's sub-network holds (None: the full model)."""
    config = message.content["config"]
    return list(config[BLOCKS]) if BLOCKS in config else None


def message_transport(message: Message) -> str:
    """How the message's float arrays travel, as the strategy that sent it stamped it
    (:data:`~resist_fl.flower.message_keys.TRANSPORT`; float32 from a strategy that does not)."""
    return str(message.content["config"].get(TRANSPORT, "float32"))


def message_run_round(message: Message) -> int:
    """The round of the run the message belongs to, as the strategy stamped it
    (:data:`~resist_fl.flower.message_keys.RUN_ROUND`; Flower's ``server-round`` from a strategy
    that does not)."""
    config = message.content["config"]
    return int(config[RUN_ROUND] if RUN_ROUND in config else config[SERVER_ROUND])


def load_received(model: torch.nn.Module, arrays: ArrayRecord,
                  blocks: list[str] | None, transport: str = "float32") -> torch.nn.Module:
    """Load ``arrays`` into ``model``, the sub-network named by ``blocks`` (the full model when
    None); return it.

    The received keys must be exactly the payload keys of ``model`` as the method's node hook built
    it for the message (its ``state_dict`` without the residual scales, which are not sent: the model
    keeps its own; for ResIST the sub-network of ``blocks``); float arrays arrive encoded under
    ``transport`` and are decoded to the model's dtypes.

    Raises
    ------
    ValueError
        The keys differ; the message counts the unexpected and the missing ones.
    """
    expected = {k for k in model.state_dict() if not is_scale_key(k)}
    if set(arrays) != expected:
        extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        what = f"blocks {blocks}" if blocks is not None else "the model the message describes"
        raise ValueError(f"received keys do not match {what}: {len(extra)} unexpected {extra[:3]}, "
                         f"{len(missing)} missing {missing[:3]}")
    if transport == "float32":
        state = arrays.to_torch_state_dict()
    else:
        own = model.state_dict()
        shapes = {k: (tuple(own[k].shape), own[k].numpy().dtype) for k in arrays}
        decoded = decode_state({k: a.numpy() for k, a in arrays.items()}, shapes, transport)
        state = {k: torch.from_numpy(np.array(v)) for k, v in decoded.items()}
    model.load_state_dict(state, strict=False)  # only the scales are not sent
    return model


def received_subnetwork(model: torch.nn.Module, layout: BlockLayout, message: Message) -> torch.nn.Module:
    """A copy of the global-shaped ``model`` cut to the training message's sub-network (its
    dropped blocks skipped as identities, the global ``state_dict`` names kept) and loaded with
    the message's arrays. ``model`` itself is not changed."""
    blocks = message_blocks(message)
    cut = copy.deepcopy(model) if blocks is None else subnetwork_of(model, layout.dropped_blocks(blocks))
    return load_received(cut, message.content["arrays"], blocks, message_transport(message))


def train_reply(message: Message, model: torch.nn.Module, *, num_examples: int, train_loss: float,
                train_seconds: float, local_steps: int,
                metrics: Mapping[str, int | float | list[int]] | None = None, private: bool = False) -> Message:
    """The reply to a training message: ``model``'s arrays under the keys the message carried
    (encoded as they arrived), and the training metrics (plus ``metrics``, numbers only).

    A non-finite ``train_loss`` (training diverged) sends no arrays: the server counts the
    reply as non-finite and keeps its global model. When the message carries ``dp-clip``
    (central DP), the update (trained minus received arrays) is clipped to that L2 norm first, and
    under adaptive clipping (``dp-count-below`` in the message) ``dp-below-clip`` says whether its norm
    was within it before.

    Under DP (``private``, and always when the message carries ``dp-clip``) the reply carries no figure
    of the node's data or training (no loss, times, costs, example count or step count: the last two
    reveal the partition's size), only ``metrics``, the caller's privacy figures; and a node whose
    trained arrays are not finite sends the arrays it received (a zero update) instead of none, so that
    no reply shows that its training diverged (a function of the released arrays alone under local DP;
    under central DP one more update within the clip).
    """
    config = message.content["config"]
    private = private or DP_CLIP in config
    if private:
        record = MetricRecord(dict(metrics or {}))
    else:
        record = MetricRecord({**dict(zip(TRAIN_METRICS, (int(num_examples), float(train_loss),
                                                          float(train_seconds), int(local_steps)))),
                               **dict(metrics or {})})
    if not private and not math.isfinite(train_loss):
        return Message(RecordDict({"arrays": ArrayRecord(), "metrics": record}), reply_to=message)
    transport = message_transport(message)
    state = model.state_dict()
    if missing := [k for k in message.content["arrays"] if k not in state]:
        raise KeyError(f"the trained model lacks {len(missing)} of the received keys, e.g. {missing[:3]}")
    trained = {k: state[k].detach().cpu().numpy() for k in message.content["arrays"]}
    if private and not all(np.isfinite(v).all() for v in trained.values() if v.dtype.kind == "f"):
        shapes = {k: (v.shape, v.dtype) for k, v in trained.items()}  # a zero update: the arrays received
        trained = {k: np.array(v) for k, v in decode_state({k: a.numpy() for k, a in message.content["arrays"].items()},
                                                           shapes, transport).items()}
    if DP_CLIP in config:  # central DP: the server rejects an update above this norm
        if transport != "float32":
            raise ValueError(f"transport-dtype = {transport!r}: central DP needs 'float32' (a quantised update "
                             "would not keep the clipped norm)")
        received = {k: array_view(v) for k, v in message.content["arrays"].items()}
        clip = float(config[DP_CLIP])
        if config.get(DP_COUNT_BELOW):
            record[BELOW_CLIP] = below_clip(trained, received, clip)
        trained = clip_update(trained, received, clip)
    arrays = ArrayRecord({k: array_of(encode_array(v, transport)) for k, v in trained.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": record}), reply_to=message)


def identity_reply(message: Message, partition_id: int | None = None, capacity: float | None = None,
                   num_partitions: int | None = None) -> Message:
    """The answer to the strategies' node-identity query: the node's ``partition_id`` (nodes are
    sampled in partition order, so a seed trains the same partitions in every run), its
    ``capacity`` in (0, 1] (the fraction of the partitionable blocks it can train) and, when it
    trains on the run's own split of the data set, ``num_partitions`` (the server can then
    evaluate per client, ``client-eval``)."""
    identity = ConfigRecord()
    if partition_id is not None:
        identity["partition-id"] = int(partition_id)
    if num_partitions is not None:
        identity["num-partitions"] = int(num_partitions)
    if capacity is not None:
        identity["capacity"] = check_capacity(capacity, "capacity")
    return Message(RecordDict({IDENTITY_RECORD: identity}), reply_to=message)
