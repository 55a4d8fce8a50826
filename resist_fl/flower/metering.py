"""Communication accounting: the bytes of the arrays actually carried, per node and round, and
the time the server itself observes each node take.

:class:`MeteredGrid` wraps the Grid a ServerApp receives and counts, for every
message pushed and every reply pulled, ``ArrayRecord.count_bytes()`` of its
array records. It measures any strategy the same way, since every message
passes through the Grid. Its ``send_and_receive`` pushes the messages one by one
and polls for replies every :data:`POLL_SECONDS`, so it also records, per
message, the seconds from pushing it to pulling its reply
(:meth:`MeteredGrid.observed_seconds`): a node's speed measured by the server,
not claimed by the node.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid


POLL_SECONDS = 0.2
"""How often ``MeteredGrid.send_and_receive`` pulls for replies (Flower's own grid: every 3 s)."""


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
    """A Grid that forwards everything to ``grid`` and counts the array bytes.

    ``replies_ready_on_push``: ``grid`` runs each node while its message is pushed (an in-process
    grid, :mod:`simulations.inprocess_grid`), so a reply not there after the push never comes (it
    'missed the timeout') and :meth:`send_and_receive` does not wait for it. Said by whoever wraps
    such a grid (:func:`simulations.inprocess.run_inprocess`), never probed.
    """

    def __init__(self, grid: Grid, *, replies_ready_on_push: bool = False) -> None:
        self._grid = grid
        self.replies_ready_on_push = replies_ready_on_push
        self._traffic = RoundTraffic()
        self._observed: dict[str, float] = {}  # message id -> seconds from push to reply pulled

    def observed_seconds(self, message_id: str) -> float | None:
        """Seconds from pushing message ``message_id`` to pulling its reply, as the server saw
        them (None if its reply did not pass through :meth:`send_and_receive`)."""
        return self._observed.get(message_id)

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
        """Push each message, then pull replies every :data:`POLL_SECONDS` until every message
        has one or ``timeout`` seconds have passed (Flower's own loop, with a finer poll), and
        record each reply's observed seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        pushed: dict[str, float] = {}
        replies: list[Message] = []
        self._observed = {}
        for message in messages:  # one by one: an in-process grid runs each node as it is pushed
            started = time.monotonic()  # before the push: an in-process grid runs the node inside it
            for message_id in self.push_messages([message]):
                pushed[message_id] = started
            self._pull_into(replies, pushed)
        if self.replies_ready_on_push:
            return replies  # every reply there is has been pulled: the rest will never come
        while pushed and (end is None or time.monotonic() < end):
            time.sleep(POLL_SECONDS if end is None else max(0.0, min(POLL_SECONDS, end - time.monotonic())))
            self._pull_into(replies, pushed)
        return replies

    def _pull_into(self, replies: list[Message], pushed: dict[str, float]) -> None:
        """Pull the replies to the ``pushed`` messages still waiting; time and forget them."""
        if not pushed:
            return
        for reply in self.pull_messages(list(pushed)):
            replies.append(reply)
            started = pushed.pop(reply.metadata.reply_to_message_id, None)
            if started is not None:
                self._observed[reply.metadata.reply_to_message_id] = time.monotonic() - started
