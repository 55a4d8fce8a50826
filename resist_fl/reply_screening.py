"""Screening of training replies, shared by ResIST and the FedAvg baseline.

A reply reaches an aggregation only if its node was sampled this round, it is
the node's first reply, and it carries exactly one ArrayRecord with exactly
the keys the node was sent (shapes and dtypes as sent, finite values) and one
MetricRecord with the training metrics of :data:`TRAIN_METRICS` as finite
scalars, ``num-examples`` an integer in [1, cap]. Everything else is dropped
whole, with a WARNING naming the node and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from resist_fl.validation import TRAIN_METRICS, ReplyError, check_finite_number, check_num_examples, check_update


@dataclass
class Accepted:
    """One accepted reply, decoded."""

    node_id: int
    arrays: ArrayRecord
    update: dict[str, np.ndarray]
    metrics: dict[str, float | int]

    @property
    def num_examples(self) -> int:
        return int(self.metrics["num-examples"])

    def content(self) -> RecordDict:
        """The reply in canonical form (record names ``arrays`` / ``metrics``, known metrics only)."""
        return RecordDict({"arrays": self.arrays, "metrics": MetricRecord(dict(self.metrics))})


@dataclass
class ScreenedReplies:
    """The outcome of :func:`screen_replies` for one round."""

    accepted: list[Accepted] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0

    def counts(self, num_sent: int) -> dict[str, int]:
        """Accepted / rejected / failed / missing (no reply by the timeout) replies."""
        accepted = len(self.accepted)
        return {"replies-accepted": accepted, "replies-rejected": self.rejected,
                "replies-failed": self.failed,
                "replies-missing": max(0, num_sent - accepted - self.rejected - self.failed)}

    def round_metrics(self, num_sent: int) -> dict[str, float | int]:
        """Counts plus the accepted replies' example-weighted loss and summed training time."""
        metrics: dict[str, float | int] = dict(self.counts(num_sent))
        if self.accepted:
            examples = [a.num_examples for a in self.accepted]
            metrics["num-examples"] = int(sum(examples))
            metrics["train-loss"] = float(np.average([a.metrics["train-loss"] for a in self.accepted],
                                                     weights=examples))
            metrics["client-seconds"] = float(sum(a.metrics["train-seconds"] for a in self.accepted))
        return metrics


def screen_replies(server_round: int, replies: Iterable[Message], sent: Mapping[int, Sequence[str]],
                   global_record: ArrayRecord, max_num_examples: int, *,
                   messages: Iterable[Message] = (),
                   order: Callable[[int], object] | None = None) -> ScreenedReplies:
    """Accept the valid training replies of a round; count and log the others.

    Parameters
    ----------
    sent : mapping of node id to keys
        What each sampled node was sent.
    global_record : ArrayRecord
        The global arrays the round started from (shapes and dtypes to match).
    messages : iterable of Message, optional
        The round's train messages (as pushed, with their ids): they name the
        node of an error reply made by the SuperLink (those come from node 1).
    order : callable, optional
        Sort key of a node id: the accepted replies are returned in this
        order, so a merge does not depend on arrival order.
    """
    out = ScreenedReplies()
    message_nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    seen: set[int] = set()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            out.failed += 1
            node_id = message_nodes.get(reply.metadata.reply_to_message_id, node_id)
            log(WARNING, "round %d: node %s failed (code %s): %s", server_round, node_id,
                reply.error.code, reply.error.reason)
            continue
        try:
            if node_id not in sent:
                raise ReplyError("this node was not sampled in this round")
            if node_id in seen:
                raise ReplyError("a second reply in the same round")
            out.accepted.append(_check_reply(node_id, reply, sent[node_id], global_record, max_num_examples))
            seen.add(node_id)
        except ReplyError as err:
            out.rejected += 1
            log(WARNING, "round %d: reply of node %s dropped: %s", server_round, node_id, err)
    if order is not None:
        out.accepted.sort(key=lambda a: order(a.node_id))
    return out


def _check_reply(node_id: int, reply: Message, keys: Sequence[str], global_record: ArrayRecord,
                 max_num_examples: int) -> Accepted:
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise ReplyError("expected exactly one ArrayRecord and one MetricRecord")
    record = next(iter(content.array_records.values()))
    reported = next(iter(content.metric_records.values()))
    try:
        update = {k: v.numpy() for k, v in record.items()}
    except Exception as err:  # undecodable bytes from a client
        raise ReplyError(f"arrays cannot be decoded: {err}") from err
    check_update(update, {k: (global_record[k].shape, global_record[k].dtype) for k in keys})
    metrics = {"num-examples": check_num_examples(reported.get("num-examples"), max_num_examples)}
    for name in TRAIN_METRICS[1:]:
        metrics[name] = check_finite_number(name, reported.get(name))
    return Accepted(node_id, record, update, metrics)
