"""Communication accounting: the bytes of the arrays actually carried, per node and round.

:class:`MeteredGrid` wraps the Grid a ServerApp receives and counts, for every
message pushed and every reply pulled, ``ArrayRecord.count_bytes()`` of its
array records. It measures any strategy the same way, since every message
passes through the Grid.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid


def array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())


@dataclass
class RoundTraffic:
    """What crossed the Grid since the last :meth:`MeteredGrid.take_round`."""

    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    train_nodes: set[int] = field(default_factory=set)
    """Nodes sent a training message (other messages, e.g. queries, carry no arrays)."""

    @property
    def total_down(self) -> int:
        return sum(self.bytes_down.values())

    @property
    def total_up(self) -> int:
        return sum(self.bytes_up.values())


class MeteredGrid(Grid):
    """A Grid that forwards everything to ``grid`` and counts the array bytes."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._traffic = RoundTraffic()

    def take_round(self) -> RoundTraffic:
        """Return the traffic counted so far and start counting afresh."""
        traffic, self._traffic = self._traffic, RoundTraffic()
        return traffic

    def _count_sent(self, messages: list[Message]) -> None:
        for message in messages:
            self._traffic.bytes_down[message.metadata.dst_node_id] += array_bytes(message)
            if message.metadata.message_type.startswith("train"):
                self._traffic.train_nodes.add(message.metadata.dst_node_id)

    def _count_received(self, replies: list[Message]) -> None:
        for reply in replies:
            self._traffic.bytes_up[reply.metadata.src_node_id] += array_bytes(reply)

    # -- Grid interface ----------------------------------------------------------------------
    def set_run(self, run):
        return self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_sent(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._count_received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._count_sent(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count_received(replies)
        return replies
