"""ResIST as a Flower strategy (Message API).

A thin adapter over the pure logic in :mod:`resist_fl.decomposition`,
:mod:`resist_fl.aggregation` and :mod:`resist_fl.validation`: each round it
samples nodes reproducibly, deals one sub-network per sampled node, sends each
node only its sub-network's arrays, validates the replies and merges them into
the FULL global record, which it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from resist_fl.aggregation import merge_partial, update_weights
from resist_fl.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.validation import ReplyError, check_num_examples, check_update


@dataclass
class ScreenedReplies:
    """The outcome of :func:`screen_replies` for one round."""

    replies: list[Message] = field(default_factory=list)
    """The accepted replies, in arrival order."""
    updates: list[dict[str, np.ndarray]] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0

    def counts(self, num_sent: int) -> dict[str, int]:
        """Accepted / rejected / failed / missing (no reply by the timeout) replies."""
        accepted = len(self.updates)
        return {"replies-accepted": accepted, "replies-rejected": self.rejected,
                "replies-failed": self.failed,
                "replies-missing": max(0, num_sent - accepted - self.rejected - self.failed)}

    def mean_loss(self) -> float:
        """Example-weighted mean of the accepted replies' training losses."""
        return float(np.average(self.losses, weights=self.examples))


def screen_replies(server_round: int, replies: Iterable[Message], sent: Mapping[int, Sequence[str]],
                   global_record: ArrayRecord, max_num_examples: int) -> ScreenedReplies:
    """Split training replies into accepted ones and dropped ones (with a WARNING each).

    A reply is accepted only if its node was sent ``sent[node]`` this round, it
    is the node's first reply, it holds one ArrayRecord with exactly those keys
    (shapes and dtypes as in ``global_record``, finite values) and one
    MetricRecord with an integer ``num-examples`` in [1, ``max_num_examples``]
    and a finite ``train-loss``.
    """
    out = ScreenedReplies()
    seen: set[int] = set()
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            out.failed += 1
            log(WARNING, "round %d: node %s failed (code %s): %s", server_round, node_id,
                reply.error.code, reply.error.reason)
            continue
        try:
            if node_id not in sent:
                raise ReplyError("this node was not sampled in this round")
            if node_id in seen:
                raise ReplyError("a second reply in the same round")
            update, num_examples, loss = _check_reply(reply, sent[node_id], global_record, max_num_examples)
        except ReplyError as err:
            out.rejected += 1
            log(WARNING, "round %d: reply of node %s dropped: %s", server_round, node_id, err)
            continue
        seen.add(node_id)
        out.replies.append(reply)
        out.updates.append(update)
        out.examples.append(num_examples)
        out.losses.append(loss)
    return out


def _check_reply(reply: Message, keys: Sequence[str], global_record: ArrayRecord,
                 max_num_examples: int) -> tuple[dict[str, np.ndarray], int, float]:
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise ReplyError("expected exactly one ArrayRecord and one MetricRecord")
    record = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    try:
        update = {k: v.numpy() for k, v in record.items()}
    except Exception as err:  # undecodable bytes from a client
        raise ReplyError(f"arrays cannot be decoded: {err}") from err
    check_update(update, {k: (global_record[k].shape, global_record[k].dtype) for k in keys})
    num_examples = check_num_examples(metrics.get("num-examples"), max_num_examples)
    loss = metrics.get("train-loss", float("nan"))
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not np.isfinite(loss):
        raise ReplyError(f"train-loss = {loss!r} is not a finite number")
    return update, num_examples, float(loss)


@dataclass(frozen=True)
class _Assignment:
    node_id: int
    blocks: tuple[str, ...]
    keys: tuple[str, ...]


class ResIST(Strategy):
    """Layer-wise decomposition of a ResNet into per-node sub-networks.

    Parameters
    ----------
    layout : BlockLayout
        Shared keys and partitionable blocks of the global model.
    fraction_train : float
        Fraction of the connected nodes sampled each round (at least
        ``min_train_nodes``); each sampled node gets its own sub-network.
    min_train_nodes, min_available_nodes : int
        Minimum nodes to sample / to wait for before sampling.
    min_blocks_per_site : int
        Minimum depth m: a sub-network holds at least this many blocks.
    weighting : str
        ``examples`` (weight replies by ``num-examples``) or ``uniform``.
    min_train_replies : int
        With fewer valid replies, the round leaves the global model unchanged.
    max_num_examples : int
        Replies claiming more examples are rejected.
    seed : int
        Node sampling and decomposition are a function of (seed, round).
    round_offset : int
        Rounds already done before this ``start()`` (a resumed run): round r
        of ``start()`` is round ``round_offset + r`` of the run.
    """

    def __init__(self, layout: BlockLayout, *, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, min_blocks_per_site: int = 0,
                 weighting: str = "examples", min_train_replies: int = 1,
                 max_num_examples: int = 10_000_000, seed: int = 0, round_offset: int = 0) -> None:
        update_weights([], weighting)  # validates the name
        if min_blocks_per_site > len(layout.partitionable):
            raise ValueError(f"min_blocks_per_site = {min_blocks_per_site} exceeds the "
                             f"{len(layout.partitionable)} partitionable blocks")
        self.layout = layout
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.min_blocks_per_site = min_blocks_per_site
        self.weighting = weighting
        self.min_train_replies = min_train_replies
        self.max_num_examples = max_num_examples
        self.seed = seed
        self.round_offset = round_offset
        self.num_subnetworks = max(1, min_train_nodes)
        self.last_round_counts: dict[str, int] = {}
        self._global: ArrayRecord | None = None
        self._assignments: dict[int, _Assignment] = {}

    # -- what the ServerApp needs ------------------------------------------------------------
    def inference_scales(self) -> dict[str, float]:
        """Residual scale of each partitionable block for the full model, given the last S."""
        return self.layout.inference_scales(self.num_subnetworks, self.min_blocks_per_site)

    def summary(self) -> None:
        p = len(self.layout.partitionable)
        log(INFO, "\t├──> ResIST decomposition:")
        log(INFO, "\t│\t├── partitionable blocks: %d (%s ... %s), shared keys: %d", p,
            self.layout.partitionable[0], self.layout.partitionable[-1], len(self.layout.shared_keys))
        log(INFO, "\t│\t├── min blocks per sub-network: %d, weighting: %s",
            self.min_blocks_per_site, self.weighting)
        log(INFO, "\t│\t└── inference scale with S=%d sub-networks: %.4f", self.num_subnetworks,
            next(iter(self.inference_scales().values())))
        log(INFO, "\t└──> Sampling: fraction %.2f, min train nodes %d, min available %d, seed %d",
            self.fraction_train, self.min_train_nodes, self.min_available_nodes, self.seed)

    # -- training ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes and send each its own sub-network's arrays and block ids."""
        if missing := sorted(set(self.layout.payload_keys()) - set(arrays)):
            raise ValueError(f"the global record lacks {len(missing)} model keys, e.g. {missing[:3]}")
        node_ids = self._wait_for_nodes(grid)
        rng = round_rng(self.seed, self.round_offset + server_round)
        size = min(len(node_ids), max(int(len(node_ids) * self.fraction_train), self.min_train_nodes))
        # Sample positions, not ids: ids are 64-bit and numpy would turn a mix of ids
        # above and below 2**63 into float64.
        sampled = sorted(node_ids[int(i)] for i in rng.choice(len(node_ids), size=size, replace=False))
        groups = sample_subnetworks(self.layout.partitionable, len(sampled), self.min_blocks_per_site, rng)
        self.num_subnetworks = len(sampled)
        self._global = arrays
        self._assignments = {}
        messages = []
        for node_id, blocks in zip(sampled, groups):
            keys = self.layout.payload_keys(blocks)
            self._assignments[node_id] = _Assignment(node_id, blocks, keys)
            payload = ArrayRecord()
            for key in keys:
                payload[key] = arrays[key]
            node_config = ConfigRecord({**config, "server-round": server_round, "blocks": list(blocks)})
            content = RecordDict({"arrays": payload, "config": node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        log(INFO, "configure_train: round %d, %d of %d nodes, sub-network depths %s", server_round,
            len(sampled), len(node_ids), [len(g) for g in groups])
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and merge the valid ones into the full global record."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        sent = {node: assignment.keys for node, assignment in self._assignments.items()}
        screened = screen_replies(server_round, replies, sent, self._global, self.max_num_examples)
        metrics = {**screened.counts(len(sent)), "num-subnetworks": self.num_subnetworks}
        self.last_round_counts = dict(metrics)
        if len(screened.updates) < self.min_train_replies:
            log(WARNING, "round %d: %d valid replies < min-train-replies %d: global model unchanged",
                server_round, len(screened.updates), self.min_train_replies)
            return None, MetricRecord(metrics)
        start = time.perf_counter()
        merged = self._merge(screened.updates, update_weights(screened.examples, self.weighting))
        metrics.update({"num-examples": int(sum(screened.examples)), "train-loss": screened.mean_loss(),
                        "merge-seconds": time.perf_counter() - start})
        return merged, MetricRecord(metrics)

    def _merge(self, updates: list[dict[str, np.ndarray]], weights: list[float]) -> ArrayRecord:
        touched = set().union(*updates)
        current = {k: self._global[k].numpy() for k in self._global if k in touched}
        merged = merge_partial(current, updates, weights)
        record = ArrayRecord()
        for key, array in self._global.items():
            record[key] = array if key not in merged else Array(np.require(merged[key], requirements="C"))
        return record

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        logged = False
        while len(node_ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if not logged:
                log(INFO, "waiting for %d nodes (%d connected)", self.min_available_nodes, len(node_ids))
                logged = True
            time.sleep(1.0)
        return node_ids

    # -- evaluation: central only (the full model never goes to a client) --------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
