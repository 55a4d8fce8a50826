"""Screening of every reply (training and federated evaluation), shared by every strategy.

The rule: **one reply per instruction, and the first one counts, whatever its
fate.** A reply is looked at only if it answers a train message pushed this
round (its ``reply_to_message_id``), comes from that message's node (or, for
an error, from the SuperLink) and is the first such reply; a later reply to the
same instruction, one from another node, or one that answers no instruction of
this round is rejected. The first reply is *failed* if it is an error, *accepted* if it
carries exactly one ArrayRecord with exactly the keys the node was sent
(real numeric arrays of the sent shapes, values that survive conversion to the
global dtypes — see :func:`resist_fl.core.validation.check_update`) and one
MetricRecord with the training metrics of :data:`TRAIN_METRICS` (numbers in
range, ``num-examples`` an integer in [1, cap]), and *rejected* otherwise.
Screening is total: whatever a reply holds, the outcome is one of these three,
with a WARNING naming the node and the reason, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID

from resist_fl.core.transport import TransportError, decode_state, encode_array
from resist_fl.core.validation import (
    CLIENT_COST_METRICS,
    EVALUATE_METRICS,
    MAX_METRIC,
    TRAIN_METRICS,
    NonFiniteError,
    ReplyError,
    check_labels,
    check_metric,
    check_num_examples,
    check_update,
    non_finite_keys,
)
from resist_fl.flower.array_codec import array_of, array_view


@dataclass
class Accepted:
    """One accepted reply, decoded; ``update`` and ``arrays`` hold the global dtypes."""

    node_id: int
    """The node it came from."""
    update: dict[str, np.ndarray]
    metrics: dict[str, Any]

    @property
    def num_examples(self) -> int:
        return int(self.metrics["num-examples"])


@dataclass
class ScreenedReplies:
    """The outcome of :func:`screen_replies` for one round."""

    accepted: list[Accepted] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0
    missing: int = 0
    non_finite: int = 0
    """Rejected replies that held NaN or Inf (arrays or metrics)."""
    private: bool = False
    """Under DP: :meth:`round_metrics` gives the counts only."""

    def reject(self, server_round: int, node: object, err: Exception) -> None:
        """Count a rejected reply and log why (one line for every reply path)."""
        self.rejected += 1
        if isinstance(err, ReplyError):
            self.non_finite += isinstance(err, NonFiniteError)
            log(WARNING, "round %d: reply of node %s dropped: %s", server_round, node, err)
        else:  # an unforeseen reply costs that reply, never the round
            log(WARNING, "round %d: reply of node %s dropped: screening raised %s: %s", server_round,
                node, type(err).__name__, err, exc_info=err)

    def fail(self, server_round: int, node: object, code: object, reason: object) -> None:
        """Count a failed reply (an error instead of a result) and log it."""
        self.failed += 1
        log(WARNING, "round %d: node %s failed (code %s): %s", server_round, node, code, reason)

    def counts(self) -> dict[str, int]:
        """Accepted / rejected / failed replies, instructions with no reply by the timeout, and
        the rejected replies that held NaN or Inf."""
        return {"replies-accepted": len(self.accepted), "replies-rejected": self.rejected,
                "replies-failed": self.failed, "replies-missing": self.missing,
                "replies-non-finite": self.non_finite}

    def round_metrics(self) -> dict[str, float | int]:
        """Counts plus the accepted replies' example-weighted loss and summed training time (under
        DP, ``private``, the counts only: examples, losses and times are node data that no noise
        covers, so they do not leave the screening)."""
        metrics: dict[str, float | int] = dict(self.counts())
        if self.accepted and not self.private:
            examples = [a.num_examples for a in self.accepted]
            metrics["num-examples"] = int(sum(examples))
            if all("train-loss" in a.metrics for a in self.accepted):  # optional on the legacy path
                metrics["train-loss"] = float(np.average([a.metrics["train-loss"] for a in self.accepted],
                                                         weights=examples))
            metrics["client-seconds"] = float(sum(a.metrics.get("train-seconds", 0.0) for a in self.accepted))
        return metrics


class Instructions:
    """The instructions a round sent, each by its id with the node it went to, and the rule every
    reply path applies to a reply: it answers one of them, comes from that instruction's node (an
    error may come from the SuperLink), and is the first reply to it; the first one counts,
    whatever its fate. Message API: an instruction is a pushed message (:meth:`of_messages`); the
    legacy API: one ``FitIns`` per client, so its id is the client's ``cid``."""

    def __init__(self, addressees: Mapping[str, object], kind: str) -> None:
        self.kind = kind
        self.by_id = dict(addressees)
        self.answered: set[str] = set()

    @classmethod
    def of_messages(cls, messages: Iterable[Message], kind: str) -> Instructions:
        """The pushed ``messages`` (those with a message id), by message id."""
        return cls({m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}, kind)

    def claim(self, instruction: str, source: object, *, from_link: bool = False) -> object:
        """The node a reply to ``instruction`` from ``source`` answers for (``from_link``: an error
        the SuperLink made for it); :class:`ReplyError` when the rule is broken."""
        if instruction not in self.by_id:
            raise ReplyError(f"it answers no {self.kind} message of this round (stale or forged)")
        addressee = self.by_id[instruction]
        if source != addressee and not from_link:
            raise ReplyError(f"it answers the {self.kind} message sent to node {addressee}")
        if instruction in self.answered:
            raise ReplyError(f"a second reply to the same {self.kind} message (the first one counts)")
        self.answered.add(instruction)
        return addressee

    def addressee(self, reply: Message) -> int:
        """:meth:`claim` for a Message reply (error replies may come from the SuperLink: node
        offline, message expired)."""
        md = reply.metadata
        return self.claim(md.reply_to_message_id, md.src_node_id,
                          from_link=reply.has_error() and md.src_node_id == SUPERLINK_NODE_ID)

    @property
    def missing(self) -> int:
        """Instructions without a reply (yet)."""
        return len(self.by_id) - len(self.answered)


def screen_evaluate_replies(server_round: int, replies: Iterable[Message], messages: Iterable[Message],
                            max_num_examples: int) -> list[MetricRecord]:
    """The valid federated-evaluation replies' metrics (:func:`check_evaluate_metrics`), under the
    same rule as training replies (:class:`Instructions`: one reply per message, from its node,
    the first one counts); the others are dropped with a WARNING naming the node and the reason."""
    instructions = Instructions.of_messages(messages, "evaluate")
    valid = []
    for reply in replies:
        try:
            instructions.addressee(reply)
            valid.append(check_evaluate_metrics(reply, max_num_examples))
        except Exception as err:  # noqa: BLE001 - ReplyError, or anything a reply can raise
            log(WARNING, "round %d: evaluate reply of node %s dropped: %s", server_round,
                getattr(reply.metadata, "src_node_id", "?"), err)
    return valid


def check_evaluate_metrics(reply: Message, max_num_examples: int) -> MetricRecord:
    """The evaluate reply's metrics (:data:`EVALUATE_METRICS`, finite scalars in range), else ReplyError."""
    if reply.has_error():
        raise ReplyError(f"error (code {reply.error.code}): {reply.error.reason}")
    content = reply.content
    if len(content.metric_records) != 1 or content.array_records or content.config_records:
        raise ReplyError(f"expected exactly one MetricRecord and nothing else (got {len(content.metric_records)} "
                         f"MetricRecord(s), {len(content.array_records)} ArrayRecord(s), "
                         f"{len(content.config_records)} ConfigRecord(s))")
    reported = next(iter(reply.content.metric_records.values()))
    metrics = {"num-examples": check_num_examples(reported.get("num-examples"), max_num_examples)}
    for name in EVALUATE_METRICS[1:]:
        metrics[name] = check_metric(name, reported.get(name), high=1.0 if name == "eval-acc" else MAX_METRIC)
    return MetricRecord(metrics)


PRIVATE_REQUIRED: tuple[str, ...] = ()
"""The training metrics a reply must carry under DP: none (a node sends no loss, times, example or step
counts there, :func:`resist_fl.flower.client_side.train_reply` with ``private``; the merge weighs replies
alike)."""


def screen_replies(server_round: int, replies: Iterable[Message], sent: Mapping[int, Sequence[str]],
                   global_record: ArrayRecord, max_num_examples: int, *,
                   messages: Iterable[Message],
                   order: Callable[[int], object] | None = None, transport: str = "float32",
                   shapes: Mapping[int, Mapping[str, tuple[tuple[int, ...], np.dtype]]] | None = None,
                   check: Callable[[Accepted], object] | None = None, private: bool = False) -> ScreenedReplies:
    """Accept the valid training replies of a round; count and log the others.

    Parameters
    ----------
    sent : mapping of node id to keys
        What each sampled node was sent.
    global_record : ArrayRecord
        The global arrays the round started from (shapes and dtypes to match).
    messages : iterable of Message
        The round's train messages, as pushed (with their message ids): a
        reply must answer one of them, and names its node through it (error
        replies made by the SuperLink come from node 1).
    order : callable, optional
        Sort key of a node id: the accepted replies are returned in this
        order, so a merge does not depend on arrival order.
    transport : str
        How the nodes encode float arrays (``transport-dtype``): replies are
        decoded to the global dtypes before any check, and an array that is not
        a valid encoding rejects its reply.
    shapes : mapping of node id to (key -> (shape, dtype)), optional
        What each node's arrays must be when they are not the global record's shapes (a
        width-sliced sub-model); by default the global record's.
    check : callable, optional
        A further check of a reply that passed the others (central DP: its update's norm); a
        ReplyError it raises rejects the reply like any other.
    private : bool
        Under DP: nodes send no training figures (none is required; ``num-examples`` is taken as 1,
        the merge weighing replies alike) and :meth:`ScreenedReplies.round_metrics` passes on counts only.
    """
    out = ScreenedReplies(private=private)
    required = PRIVATE_REQUIRED if private else TRAIN_METRICS[1:]
    instructions = Instructions.of_messages(messages, "train")
    for reply in replies:
        node_id = "?"
        try:
            node_id = reply.metadata.src_node_id
            addressee = instructions.addressee(reply)
            is_error = reply.has_error()
            if is_error:
                out.fail(server_round, addressee, reply.error.code, reply.error.reason)
                continue
            if node_id not in sent:
                raise ReplyError("this node was not sent a sub-network this round")
            expected = shapes[node_id] if shapes is not None else global_specs(global_record, sent[node_id])
            accepted = _check_reply(node_id, reply, expected, max_num_examples, transport, required, not private)
            if check is not None:
                check(accepted)
            out.accepted.append(accepted)
        except Exception as err:  # noqa: BLE001 - screening is total: a reply costs that reply, never the round
            out.reject(server_round, node_id, err)
    out.missing = instructions.missing
    if order is not None:
        out.accepted.sort(key=lambda a: order(a.node_id))
    return out


def _check_reply(node_id: int, reply: Message, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 max_num_examples: int, transport: str = "float32",
                 required: Sequence[str] = TRAIN_METRICS[1:], examples: bool = True) -> Accepted:
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise ReplyError("expected exactly one ArrayRecord and one MetricRecord")
    record = next(iter(content.array_records.values()))
    reported = next(iter(content.metric_records.values()))
    metrics = check_reply_metrics(reported, max_num_examples, required=required,  # before the arrays: a diverged node
                                  examples=examples)
    try:                                                       # reports a non-finite loss
        decoded = {k: array_view(v) for k, v in record.items()}
    except Exception as err:  # undecodable bytes from a client
        raise ReplyError(f"arrays cannot be decoded: {err}") from err
    update = check_reply_arrays(decoded, expected, transport)
    return Accepted(node_id, update, metrics)


def global_specs(global_record: ArrayRecord, keys: Sequence[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of each of ``keys`` in the global record: what a reply must match."""
    return {k: (tuple(global_record[k].shape), np.dtype(global_record[k].dtype)) for k in keys}


def check_reply_metrics(reported: Mapping[str, object], max_num_examples: int, *,
                        required: Sequence[str] = TRAIN_METRICS[1:], examples: bool = True) -> dict[str, float | int]:
    """The reply's known metrics, checked (the rule of every reply path), else :class:`ReplyError`.

    ``num-examples`` is always required (an integer in [1, cap]); the other training metrics are
    required when named in ``required`` (the project's ClientApp sends them all; a legacy
    ``NumPyClient`` may send none) and checked whenever present, as are the optional client
    costs (:data:`~resist_fl.core.validation.CLIENT_COST_METRICS`). Unknown keys are ignored.
    Without ``examples`` (under DP) ``num-examples`` is neither required nor read: it is 1.
    """
    metrics: dict[str, float | int] = {
        "num-examples": check_num_examples(reported.get("num-examples"), max_num_examples) if examples else 1}
    for name in (*TRAIN_METRICS[1:], *CLIENT_COST_METRICS):
        if name in required or name in reported:
            metrics[name] = check_metric(name, reported.get(name))
    if "labels-held" in reported:  # label-split: the labels of the node's data (HeteroFL / FedRolex)
        metrics["labels-held"] = check_labels(reported["labels-held"])
    return metrics


def check_reply_arrays(decoded: Mapping[str, object], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                       transport: str = "float32") -> dict[str, np.ndarray]:
    """The decoded arrays of a reply in the global dtypes (the rule of every reply path): decoded
    from ``transport`` first, then :func:`~resist_fl.core.validation.check_update`; else
    :class:`ReplyError`."""
    if transport != "float32":
        try:
            decoded = decode_state(decoded, expected, transport)
        except TransportError as err:
            raise ReplyError(str(err)) from None
    return check_update(decoded, expected)


def encoded_record(arrays: ArrayRecord, transport: str) -> ArrayRecord:
    """``arrays`` as they travel under ``transport`` (the same record for ``float32``)."""
    if transport == "float32":
        return arrays
    return ArrayRecord({k: array_of(encode_array(array_view(v), transport))
                        for k, v in arrays.items()})


def too_few_replies(server_round: int, accepted: int, minimum: int) -> bool:
    """True (and a WARNING) if ``accepted`` valid replies are fewer than ``minimum``
    (``min-train-replies``): the round then leaves the global model unchanged."""
    if accepted < minimum:
        log(WARNING, "round %d: %d valid replies < min-train-replies %d: global model unchanged",
            server_round, accepted, minimum)
    return accepted < minimum


def refuse_non_finite(server_round: int, merged: Mapping[str, np.ndarray], metrics: dict) -> bool:
    """True (and ``metrics["merge-refused"] = 1``, a WARNING) if ``merged`` holds NaN or Inf.

    The last line of defence: a merge of screened replies is finite, but if it
    ever is not, the round keeps the global model rather than corrupt it.
    """
    bad = non_finite_keys(merged)
    if bad:
        metrics["merge-refused"] = 1
        log(WARNING, "round %d: the merge gave non-finite values in %d array(s), e.g. %s: merge refused, "
            "global model unchanged", server_round, len(bad), bad[:3])
    return bool(bad)
