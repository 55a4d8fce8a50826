"""A synchronous, in-process ``Grid`` for fast tests of Flower strategies.

``InProcessGrid`` lets a test drive the *real* ``Strategy.start()`` loop of ``flwr.serverapp.strategy``
(Flower 1.42 Message API) against a *real* ``flwr.clientapp.ClientApp`` without a SuperLink, SuperNodes,
Ray or subprocesses::

    grid = InProcessGrid(client_app, num_nodes=3, run_config={"lr": 0.1})
    result = FedAvg().start(grid=grid, initial_arrays=arrays, num_rounds=2)

Behaviour, mirroring the deployed runtime as closely as is practical:

* Every pushed message gets ``message_id = msg.object_id`` (as ``HttpGrid`` does) and is validated like
  the SuperLink would (instruction message, ``ttl > 0``, known ``dst_node_id``, matching ``run_id``).
* Messages travel "over the wire": each message and each reply is deflated/inflated with Flower's own
  object serialization, so a ClientApp never shares objects with the strategy (``FedAvg`` sends one
  shared ``RecordDict`` to every node!) and unserializable content fails loudly. (``copy.deepcopy`` is
  *not* usable for records: once a record's ``object_id`` was computed it caches ``memoryview`` objects
  that cannot be pickled.)
* Each node has its own persistent ``Context`` (``node_id``, ``node_config``, ``run_config``, ``state``).
  The ClientApp runs on a copy of it that is committed back only if the call succeeds -- in Flower a
  failing ClientApp does not update the node state either.
* Replies are built by the ClientApp as in production (``Message(content, reply_to=msg)``), so
  ``reply.metadata.src_node_id`` is the node id, ``dst_node_id`` is the server (``SUPERLINK_NODE_ID ==
  1``) and ``reply_to_message_id`` is the instruction's ``message_id``.

Fault injection (the sets may be changed between rounds):

* ``fail_nodes``: the ClientApp is not run; the node replies with ``Message(Error(code=2, reason=...),
  reply_to=msg)`` (code 2 is ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``).
* ``drop_nodes``: the ClientApp *is* run (a straggler: its state advances) but the reply never reaches
  the server, exactly as if it missed the timeout. Discarded replies are kept in ``grid.dropped``.
* A ClientApp that raises: with ``raise_client_errors=True`` (default) the exception propagates so that
  test failures are easy to debug; with ``False`` it becomes an error reply with code 2 and the reason
  format used by ``flwr-clientapp`` (``"<class 'ValueError'>:<'boom'>"``).

Constructing a ``Message`` for a node (``Message(content, dst_node_id, message_type)``) reads the private
``flwr.supercore.task_identity.TaskIdentity`` (run_id / node_id / task_id) and raises ``RuntimeError`` if
it is unset. The grid therefore sets it on construction (as ``run_simulation`` does), using ``run_id``
(default ``DEFAULT_RUN_ID`` so that several grids agree), node id ``SUPERLINK_NODE_ID`` and task id 1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["DEFAULT_RUN_ID", "InProcessGrid", "make_node_ids", "set_server_task_identity"]

DEFAULT_RUN_ID = 424242
"""Run id used by default; shared by all grids so messages built for one grid remain valid for another."""


def make_node_ids(num_nodes: int) -> list[int]:
    """The node ids of ``InProcessGrid``: ``1000 + i * 7919``, distinct, "random-looking", never
    ``SUPERLINK_NODE_ID`` (1) and never the partition index."""
    return [1000 + i * 7919 for i in range(num_nodes)]


def set_server_task_identity(run_id: int = DEFAULT_RUN_ID) -> None:
    """Set ``TaskIdentity`` as a ServerApp process would (needed by ``Message``)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


_T = TypeVar("_T", bound=InflatableObject)


def _wire_copy(obj: _T) -> _T:
    """Deep-copy a ``Message``/``RecordDict``/record via Flower's serialization (a ``Message``'s
    ``message_id`` is not serialized and is copied over)."""
    with no_object_id_recompute():
        contents = {obj_id: o.deflate() for obj_id, o in get_all_nested_objects(obj).items()}
        root_id = obj.object_id
    out = inflate_object_from_contents(root_id, contents)
    assert isinstance(out, type(obj))
    if isinstance(obj, Message):
        out.metadata.__dict__["_message_id"] = obj.metadata.message_id
    return out


def _copy_context(ctx: Context) -> Context:
    """Deep-copy a ``Context`` (its ``state`` via serialization)."""
    return Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=copy.deepcopy(ctx.node_config),
                   state=_wire_copy(ctx.state), run_config=copy.deepcopy(ctx.run_config), series_id=ctx.series_id)


def _error_reply(msg: Message, reason: str) -> Message:
    """The error reply to ``msg`` with code 2 (``CLIENT_APP_RAISED_EXCEPTION``), its message id set."""
    return InProcessGrid._finalize_reply(
        Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))


class InProcessGrid(Grid):
    """Synchronous ``Grid`` that executes a ``ClientApp`` in-process.

    ``client_app`` is called as ``client_app(message=msg, context=ctx)`` for every message, like
    ``flwr-clientapp``; ``num_nodes`` simulated SuperNodes each get ``run_config`` (copied per node) and
    their ``node_configs`` entry (default ``{"partition-id": i, "num-partitions": num_nodes}``);
    ``fail_nodes`` / ``drop_nodes`` / ``raise_client_errors``: the faults of the module docstring;
    ``run_id``: of the ``Run`` and of every ``Context``.

    Attributes: ``node_ids`` (in partition order), ``contexts`` (the persistent per-node contexts),
    ``sent`` (every message the strategy pushed, in order, with ``message_id`` set), ``replies`` (every
    reply delivered, in order, error replies included), ``dropped`` (the replies of ``drop_nodes``,
    never delivered).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None,
                 node_configs: list[dict[str, Any]] | None = None, *, fail_nodes: Iterable[int] = (),
                 drop_nodes: Iterable[int] = (), raise_client_errors: bool = True,
                 run_id: int = DEFAULT_RUN_ID) -> None:
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"node_configs has {len(node_configs)} entries, expected {num_nodes}")
        self.client_app = client_app
        self.raise_client_errors = raise_client_errors
        self.fail_nodes: set[int] = set(fail_nodes)
        self.drop_nodes: set[int] = set(drop_nodes)
        self._run = Run.create_empty(run_id)
        set_server_task_identity(run_id)
        self.node_ids: list[int] = make_node_ids(num_nodes)
        self.contexts: dict[int, Context] = {
            node_id: Context(run_id=run_id, node_id=node_id, state=RecordDict(),
                             node_config=dict(node_configs[i]) if node_configs is not None
                             else {"partition-id": i, "num-partitions": num_nodes},
                             run_config=copy.deepcopy(dict(run_config or {})))
            for i, node_id in enumerate(self.node_ids)}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.dropped: list[Message] = []
        self._pending: dict[str, Message] = {}  # replies pushed and not yet pulled, by message id

    def context(self, node_id: int) -> Context:
        """The current persistent ``Context`` of ``node_id`` (each successful ClientApp call replaces it with
        the copy the ClientApp mutated: fetch it again after a round)."""
        return self.contexts[node_id]

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run)}")
        self._run = run
        set_server_task_identity(run.run_id)

    @property
    def run(self) -> Run:
        """Run information (a copy)."""
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Create a message (deprecated in Flower; use ``Message(...)``)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The ids of all (always connected) nodes."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver messages; the ClientApp runs synchronously for each one (replies wait for ``pull_messages``)."""
        message_ids: list[str] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self._check_message(msg)
            self.sent.append(msg)
            message_ids.append(msg.metadata.message_id)
            reply = self._dispatch(msg)
            if msg.metadata.dst_node_id in self.drop_nodes:
                self.dropped.append(reply)
            else:
                self._pending[msg.metadata.message_id] = reply
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the available replies to ``message_ids``."""
        out = [reply for reply in (self._pending.pop(msg_id, None) for msg_id in message_ids) if reply is not None]
        self.replies.extend(out)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push messages and return all replies (no waiting: ``timeout`` unused; the replies of ``drop_nodes``
        are missing, as if they missed the timeout)."""
        del timeout  # everything happens synchronously
        return self.pull_messages(self.push_messages(messages))

    def _check_message(self, msg: Message) -> None:
        """Validate an instruction message as the SuperLink would."""
        md = msg.metadata
        if md.reply_to_message_id != "" or md.ttl <= 0:
            raise ValueError(f"Invalid instruction message: {msg}")
        if md.dst_node_id not in self.contexts:
            raise ValueError(f"Unknown dst_node_id {md.dst_node_id}; known: {self.node_ids}")
        if md.run_id != self._run.run_id:
            raise ValueError(f"Message run_id {md.run_id} != grid run_id {self._run.run_id} "
                             "(TaskIdentity was changed after the grid was created?)")
        if md.src_node_id != SUPERLINK_NODE_ID:
            raise ValueError(f"Invalid src_node_id {md.src_node_id}")

    def _dispatch(self, msg: Message) -> Message:
        """Run the ClientApp of ``msg``'s destination and return the reply."""
        node_id = msg.metadata.dst_node_id
        if node_id in self.fail_nodes:
            return _error_reply(msg, f"InProcessGrid: injected failure of node {node_id}")
        delivered = _wire_copy(msg)  # as if it crossed the network
        work_ctx = _copy_context(self.contexts[node_id])  # the ClientApp's copy; committed only on success
        try:
            reply = self.client_app(message=delivered, context=work_ctx)
            if not isinstance(reply, Message):
                raise TypeError(f"ClientApp returned {type(reply).__name__}, expected Message")
            if reply.metadata.reply_to_message_id != msg.metadata.message_id:
                raise ValueError("ClientApp reply is not a reply to the received message; "
                                 "build it with `Message(content, reply_to=msg)`")
        except Exception as ex:
            if self.raise_client_errors:
                raise
            return _error_reply(msg, str(type(ex)) + ":<'" + str(ex) + "'>")  # as flwr-clientapp words it
        self.contexts[node_id] = work_ctx
        return _wire_copy(self._finalize_reply(reply))

    @staticmethod
    def _finalize_reply(reply: Message) -> Message:
        """Give a reply its message id (``object_id``, as in Flower)."""
        if not reply.metadata.message_id:
            reply.metadata.__dict__["_message_id"] = reply.object_id
        return reply
