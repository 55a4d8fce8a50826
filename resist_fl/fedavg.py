"""Flower's own FedAvg, with the same reply screening as ResIST in front of it.

The algorithm is ``flwr.serverapp.strategy.FedAvg`` unchanged; only replies
that pass :func:`resist_fl.strategy.screen_replies` reach its
``aggregate_train``, so a malformed client reply is dropped with a WARNING
instead of ending the run (Flower raises ``InconsistentMessageReplies``) or
writing NaN into the global model.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from resist_fl.strategy import screen_replies
from resist_fl.validation import TRAIN_METRICS, ReplyError


class ScreenedFedAvg(FedAvg):
    """FedAvg whose training replies are validated first.

    Parameters
    ----------
    min_train_replies : int
        With fewer valid replies, the round leaves the global model unchanged.
    max_num_examples : int
        Replies claiming more examples are rejected.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, min_train_replies: int = 1, max_num_examples: int = 10_000_000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_train_replies = min_train_replies
        self.max_num_examples = max_num_examples
        self.last_round_counts: dict[str, int] = {}
        self._global: ArrayRecord | None = None
        self._sent: dict[int, tuple[str, ...]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global = arrays
        self._sent = {m.metadata.dst_node_id: tuple(arrays.keys()) for m in messages}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = screen_replies(server_round, replies, self._sent, self._global, self.max_num_examples)
        valid = []
        for reply in screened.replies:  # FedAvg needs the same metric keys in every reply
            keys = set(next(iter(reply.content.metric_records.values())).keys())
            if keys == set(TRAIN_METRICS):
                valid.append(reply)
                continue
            log(WARNING, "round %d: reply of node %s dropped: %s", server_round, reply.metadata.src_node_id,
                ReplyError(f"metrics {sorted(keys)}, expected {sorted(TRAIN_METRICS)}"))
        counts = screened.counts(len(self._sent))
        counts["replies-rejected"] += len(screened.replies) - len(valid)
        counts["replies-accepted"] = len(valid)
        self.last_round_counts = counts
        if len(valid) < self.min_train_replies:
            log(WARNING, "round %d: %d valid replies < min-train-replies %d: global model unchanged",
                server_round, len(valid), self.min_train_replies)
            return None, MetricRecord(counts)
        arrays, metrics = super().aggregate_train(server_round, valid)
        return self._keep_dtypes(arrays), MetricRecord({**(metrics or {}), **counts})

    def _keep_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Cast back to the global dtypes: Flower's mean turns int64 buffers into float64."""
        record = ArrayRecord()
        for key, array in arrays.items():
            dtype = np.dtype(self._global[key].dtype)
            if np.dtype(array.dtype) == dtype:
                record[key] = array
                continue
            value = array.numpy()
            if dtype.kind in "iub":
                value = np.rint(value)
            record[key] = Array(np.require(value.astype(dtype), requirements="C"))
        return record
