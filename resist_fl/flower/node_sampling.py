"""Reproducible node sampling for every strategy.

Flower's node ids are random 64-bit numbers, new for every simulation run and
for every SuperNode restart, and Flower's own ``sample_nodes`` draws from the
global ``random`` module. Here nodes are put in a stable order (by the
``partition-id`` each node reports once, through a query message; by node id
for nodes without one) and sampled with a generator seeded by (seed, round).
The same seed therefore trains the same partitions with the same
sub-networks in every run, which also makes a resumed run identical to an
uninterrupted one.

With ``secret=True`` (central DP with ``dp-sampling='secret'``) the positions are drawn from OS
entropy instead (:mod:`resist_fl.core.secure_random`): the sample is then not reproducible from
anything the run publishes, which is what amplification by subsampling needs. The round's
generator handed on for dealing stays seeded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from resist_fl.core.allocation import check_capacity
from resist_fl.core.decomposition import round_rng
from resist_fl.core.secure_random import secure_numpy_generator
from resist_fl.core.validation import ReplyError
from resist_fl.flower.reply_screening import Instructions

MAX_PARTITIONS = 100_000
"""A node reporting more partitions than this is not believed (the server would split the data that often)."""
IDENTITY_RECORD = "node"
"""ConfigRecord of a query reply holding the node's ``partition-id`` and ``capacity`` (if any)."""


def sample_positions(count: int, fraction: float, min_nodes: int, rng: np.random.Generator) -> list[int]:
    """Positions (sorted) of ``max(int(count * fraction), min_nodes)`` of ``count`` ordered nodes
    (all of them at most), drawn from ``rng``: the one sampling draw of every strategy and of
    the legacy adapter."""
    size = min(count, max(int(count * fraction), min_nodes))
    return sorted(int(i) for i in rng.choice(count, size=size, replace=False))


DYNAMIC_STREAM = 104_729
"""Dynamic capacities are drawn from their own stream of the seed (not the sampling draw's)."""


class NodeSampler:
    """Sample ``max(int(n * fraction), min_nodes)`` of the n connected nodes per round.

    Parameters
    ----------
    fraction : float
        Fraction of the connected nodes to sample, in (0, 1].
    min_nodes : int
        Sample at least this many nodes (capped at the connected nodes).
    min_available_nodes : int
        Wait until this many nodes are connected.
    seed : int
        Sampling is a function of (seed, round) and the nodes' stable order.
    query_timeout : float
        Seconds to wait for nodes to report their partition id.
    secret : bool
        Draw the sample from OS entropy (not from the seed): a secret sample.
    dynamic_profile : sequence of float, optional
        ``capacity-mode='dynamic'``: every round, each sampled node's capacity is drawn anew from
        these values (each equally likely), from a generator of (seed, round, the node's stable key)
        alone, so it does not depend on which other nodes were sampled. None: each node keeps the
        capacity it reported.
    """

    def __init__(self, *, fraction: float, min_nodes: int, min_available_nodes: int, seed: int,
                 query_timeout: float = 120.0, secret: bool = False,
                 dynamic_profile: Sequence[float] | None = None) -> None:
        self.secret = secret
        self.dynamic_profile = tuple(dynamic_profile) if dynamic_profile else None
        self._round_capacity: dict[int, float] = {}
        self._secret_rng = secure_numpy_generator() if secret else None
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.query_timeout = query_timeout
        self._rank_key: dict[int, tuple[int, int, int]] = {}
        self._capacity: dict[int, float] = {}
        self._num_partitions: dict[int, int] = {}

    def sample(self, grid: Grid, run_round: int) -> tuple[list[int], int, np.random.Generator]:
        """The sampled node ids (in stable order), the number connected, and the round's generator.

        The generator has made the sampling draw; callers continue with it
        (ResIST deals its blocks with it).
        """
        declared = self.identify(grid)
        ordered = list(declared)
        if self.secret and len(capacities := sorted(set(declared.values()))) > 1:
            raise RuntimeError(f"dp-sampling = 'secret': the connected nodes declare capacities {capacities}; what a "
                               "node is sent depends on its capacity and each round's bytes and sub-models are "
                               "released, so the sample would not stay secret. Give every node one capacity "
                               "(node config `capacity`), or run with dp-sampling = 'public'")
        rng = round_rng(self.seed, run_round)
        picked = sample_positions(len(ordered), self.fraction, self.min_nodes, self._secret_rng or rng)
        sampled = [ordered[i] for i in picked]
        if self.dynamic_profile:
            self._round_capacity = {n: self.drawn_capacity(n, run_round) for n in sampled}
        return sampled, len(ordered), rng

    def identify(self, grid: Grid) -> dict[int, float]:
        """Wait for ``min_available_nodes``, ask the nodes not seen before who they are, and give every
        connected node's declared capacity, in :meth:`stable_order` (what :meth:`sample` does first; the
        ServerApp calls it before it builds a model that depends on the nodes, FedAvg-small's)."""
        ordered = self.stable_order(grid, self._wait_for_nodes(grid))
        return {node: self._capacity.get(node, 1.0) for node in ordered}

    def drawn_capacity(self, node_id: int, run_round: int) -> float:
        """``capacity-mode='dynamic'``: ``node_id``'s capacity in ``run_round``, drawn from the profile."""
        key = self.key(node_id).encode()
        draw = np.random.default_rng([int(self.seed), int(run_round), DYNAMIC_STREAM, *key])
        return float(self.dynamic_profile[int(draw.integers(len(self.dynamic_profile)))])

    def capacity(self, node_id: int) -> float:
        """The capacity of a node this round: drawn for the round (``capacity-mode='dynamic'``), else
        the one it reported (the fraction of its budget it can train), else 1.0."""
        if node_id in self._round_capacity:
            return self._round_capacity[node_id]
        return self._capacity.get(node_id, 1.0)

    def key(self, node_id: int) -> str:
        """A node's stable key across SuperNode restarts and resumed runs (its privacy ledger
        entry): ``partition-<id>`` when it reported one, else ``node-<node id>``."""
        partition = self.partition(node_id)
        return f"partition-{partition}" if partition is not None else f"node-{node_id}"

    def num_partitions(self) -> int | None:
        """The number of partitions of the run's data split, when every identified node trains on one
        and they agree (and it is at most :data:`MAX_PARTITIONS`); otherwise None."""
        values = set(self._num_partitions.values())
        if len(values) != 1 or len(self._num_partitions) != len(self._rank_key):
            return None
        return values.pop()

    def partition_capacities(self) -> dict[int, float]:
        """The capacity each identified partition's node reported (its fixed one), by partition id."""
        return {key[1]: self._capacity.get(node, 1.0) for node, key in self._rank_key.items() if key[0] == 0}

    def partition(self, node_id: int) -> int | None:
        """The partition id a node reported, else None."""
        kind, value, _ = self.rank(node_id)
        return value if kind == 0 else None

    def rank(self, node_id: int) -> tuple[int, int, int]:
        """Sort key of a node: (0, partition-id, node id) when it reported one, else (1, node id,
        node id). The node id breaks ties, so two nodes reporting the same partition id are
        ordered the same way whatever order the Grid lists them in."""
        return self._rank_key.get(node_id, (1, node_id, node_id))

    def stable_order(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """``node_ids`` sorted by :meth:`rank`; asks nodes not seen before for their partition id."""
        unknown = [n for n in node_ids if n not in self._rank_key]
        if unknown:
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
            replies = list(grid.send_and_receive(queries, timeout=self.query_timeout))
            instructions = Instructions.of_messages(queries, "identity query")
            for reply in replies:
                try:  # the rule of every reply path: one reply per query, from the node it was sent to
                    node = instructions.addressee(reply)
                except ReplyError as err:
                    log(WARNING, "identity reply of node %s dropped: %s", reply.metadata.src_node_id, err)
                    continue
                if reply.has_error():
                    reason = (reply.error.reason or "").strip().splitlines()
                    log(WARNING, "node %s did not answer the identity query (%s): ordered by node id, capacity 1.0",
                        node, reason[-1] if reason else f"error code {reply.error.code}")
                    continue
                if IDENTITY_RECORD not in reply.content.config_records:
                    continue
                identity = reply.content.config_records[IDENTITY_RECORD]
                pid = identity.get("partition-id")
                if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
                    self._rank_key[node] = (0, pid, node)
                    parts = identity.get("num-partitions")
                    if isinstance(parts, int) and not isinstance(parts, bool) and 0 <= pid < parts <= MAX_PARTITIONS:
                        self._num_partitions[node] = parts
                capacity = identity.get("capacity", 1.0)
                try:
                    self._capacity[node] = check_capacity(capacity)
                except ValueError as err:
                    log(WARNING, "node %s reported an invalid capacity (%s): treated as 1.0", node, err)
            for node in unknown:
                self._rank_key.setdefault(node, (1, node, node))
                log(INFO, "node %s: partition %s, capacity %.3g", node, self.partition(node), self.capacity(node))
            self._warn_shared_partitions(unknown)
        return sorted(node_ids, key=self.rank)

    def _warn_shared_partitions(self, new_nodes: list[int]) -> None:
        """A WARNING for every partition id that a newly identified node shares with another."""
        for pid in sorted({self.partition(n) for n in new_nodes} - {None}):
            holders = sorted(n for n, key in self._rank_key.items() if key[0] == 0 and key[1] == pid)
            if len(holders) > 1:
                log(WARNING, "nodes %s all report partition-id %d: they train the same partition; ordered "
                    "by node id among themselves. Give each node its own partition-id (node config)",
                    ", ".join(map(str, holders)), pid)

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        logged = False
        while len(node_ids := list(grid.get_node_ids())) < self.min_available_nodes:
            if not logged:
                log(INFO, "waiting for %d nodes (%d connected)", self.min_available_nodes, len(node_ids))
                logged = True
            time.sleep(1.0)
        return node_ids
