"""ResIST for Flower's legacy ``Strategy`` API (``configure_fit`` / ``aggregate_fit``): an adapter.

Most published Flower baselines use ``ServerApp(server_fn=...)`` with a
``flwr.server.strategy.Strategy`` and ``NumPyClient``s. :class:`LegacyResIST` is not a second
ResIST: it holds a :class:`resist_fl.flower.resist.ResIST` and delegates the round to it — the same
sampling and plan (allocation, capacities, warm-up, minimum holders), the same settle / merge /
server step / non-finite refusal and the same round report (a recorder can read
:meth:`LegacyResIST.round_report`). What it adds is the translation: the legacy client list becomes
the node ids the strategy samples from, each planned message becomes a ``FitIns``, and each
``(proxy, FitRes)`` goes through :func:`screen_fit_results` (the Message API's rules, counts and log
lines for a reply that travels as a list) before the strategy settles and merges it.

Parameters travel as lists in the legacy API, so the key names travel with them: every
``FitIns`` config holds ``keys``, the comma-separated state_dict names of its arrays in order,
and a reply must return exactly that many arrays in that order (:func:`named_arrays` reads them
on the client). The global parameters are ordered by ``layout.payload_keys()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model_cost import CostModel
from resist_fl.core.npy_bytes import NpyError, read_npy
from resist_fl.core.validation import ReplyError
from resist_fl.flower.array_codec import array_of, array_view
from resist_fl.flower.reply_screening import (
    Accepted,
    Instructions,
    ScreenedReplies,
    check_reply_arrays,
    check_reply_metrics,
    too_few_replies,
)
from resist_fl.flower.resist import ResIST
from resist_fl.flower.round_report import RoundReport
from resist_fl.run.settings import RunSettings

KEYS = "keys"
"""Fit-config entry: the comma-separated names of the arrays, in order."""


def named_arrays(config: Mapping[str, Scalar], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a ``FitIns`` (or a reply to it) by name; ValueError if the counts differ."""
    keys = str(config[KEYS]).split(",")
    if len(keys) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(keys)} names in the fit config's {KEYS!r}")
    return dict(zip(keys, arrays))


def cid_rank(cid: object) -> tuple[int, int | str]:
    """Sort key of a legacy client id: numeric ids by value (Flower's are node ids), then any
    other id by its text; total, whatever a client proxy's ``cid`` holds."""
    text = str(cid)
    return (0, int(text)) if text.isdecimal() else (1, text)


def decode_tensors(parameters: object, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of a legacy reply's ``Parameters`` by name (``keys``, the order they were sent),
    each read strictly from its ``.npy`` bytes (:func:`~resist_fl.core.npy_bytes.read_npy`: nothing
    is allocated beyond the bytes received); else :class:`ReplyError`."""
    if not isinstance(parameters, Parameters):
        raise ReplyError(f"parameters = {type(parameters).__name__}, expected flwr.common.Parameters")
    if parameters.tensor_type != "numpy.ndarray":
        raise ReplyError(f"tensor_type = {str(parameters.tensor_type)[:40]!r}, expected 'numpy.ndarray'")
    tensors = parameters.tensors
    if not isinstance(tensors, (list, tuple)):
        raise ReplyError(f"tensors = {type(tensors).__name__}, expected a list of .npy bytes")
    if len(tensors) != len(keys):
        raise ReplyError(f"{len(tensors)} arrays for the {len(keys)} it was sent")
    named = {}
    for key, tensor in zip(keys, tensors):
        try:
            named[key] = read_npy(tensor)
        except NpyError as err:
            raise ReplyError(f"{key} cannot be decoded: {err}") from None
    return named


def screen_fit_results(server_round: int, results: Sequence[object], failures: Sequence[object],
                       sent: Mapping[str, Sequence[str]],
                       specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], max_num_examples: int,
                       node_of: Callable[[str], object] = str) -> ScreenedReplies:
    """Screen the legacy replies of a round with the Message API's rules, counts and log lines.

    The first-reply rule is the Message API's (:class:`Instructions`, with the client's ``cid`` as
    the id of the one ``FitIns`` it was sent): a reply must answer a client sent a sub-network this
    round, be its first (a second ``(proxy, FitRes)`` of the same ``cid`` is rejected), be a
    ``FitRes`` with status OK, carry exactly the arrays it was sent (decoded strictly) and pass
    :func:`check_reply_metrics` / :func:`check_reply_arrays` with ``num_examples`` as
    ``num-examples``. ``failures`` are counted as failed. Total: whatever ``results`` and
    ``failures`` hold, each entry is accepted, rejected or failed, never raised. The accepted
    replies are in client order (:func:`cid_rank`), each under ``node_of(cid)`` (the adapter's node id).
    """
    out = ScreenedReplies()
    instructions = Instructions({cid: cid for cid in sent}, "fit")  # one FitIns per client: its id is the cid
    for entry in results if isinstance(results, (list, tuple)) else ():
        cid = "?"
        try:
            proxy, res = entry
            cid = str(proxy.cid)
            instructions.claim(cid, cid)
            if not isinstance(res, FitRes):
                raise ReplyError(f"the reply is a {type(res).__name__}, expected a FitRes")
            status = getattr(res, "status", None)
            if status is not None and status.code != Code.OK:
                out.fail(server_round, cid, status.code, status.message)
                continue
            reported = res.metrics if isinstance(res.metrics, Mapping) else {}
            metrics = check_reply_metrics({**reported, "num-examples": res.num_examples}, max_num_examples,
                                          required=())
            update = check_reply_arrays(decode_tensors(res.parameters, sent[cid]),
                                        {k: specs[k] for k in sent[cid]})
            out.accepted.append(Accepted(node_of(cid), update, metrics))
        except Exception as err:  # noqa: BLE001 - screening is total
            out.reject(server_round, cid, err)
    for failure in failures if isinstance(failures, (list, tuple)) else ():
        proxy, res = failure if isinstance(failure, tuple) and len(failure) == 2 else (None, failure)
        cid = str(getattr(proxy, "cid", "?"))
        status = getattr(res, "status", None)
        with suppress(ReplyError):  # a failure of a client sent a FitIns answers it; any other is counted only
            instructions.claim(cid, cid)
        out.fail(server_round, cid, getattr(status, "code", type(res).__name__), getattr(status, "message", res))
    out.missing = instructions.missing
    out.accepted.sort(key=lambda a: cid_rank(a.node_id))
    return out


class ClientList:
    """The part of a ``Grid`` :class:`~resist_fl.flower.node_sampling.NodeSampler` reads, over a legacy
    client list: node ids, and no identity replies (legacy clients cannot answer a query message:
    they are ordered by id, capacity 1.0)."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Sequence[Message], *, timeout: float | None = None) -> list[Message]:
        return []


def legacy_config(config: ConfigRecord) -> dict[str, Scalar]:
    """A message's config as a legacy ``FitIns`` config (lists joined with commas)."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in config.items()}


class LegacyResIST(Strategy):
    """ResIST as a legacy Flower ``Strategy``, delegating every round to a :class:`ResIST`.

    Parameters
    ----------
    layout : BlockLayout
        Shared keys and partitionable blocks of the global model.
    initial_state : mapping of str to ndarray
        The global model's initial arrays (at least ``layout.payload_keys()``).
    settings : RunSettings, optional
        The run's values, as for :class:`ResIST` (``fraction-train``, ``min-train-nodes``,
        ``min-available-nodes`` are the legacy ``fraction_fit``, ``min_fit_clients``,
        ``min_available_clients``); legacy clients receive plain arrays (``transport-dtype``
        ``float32``) and no DP instructions (``dp='none'``).
    costs : CostModel, optional
        As for :class:`ResIST` (needed unless ``capacity-measure`` is ``blocks``).
    **overrides
        RunSettings fields to change.
    """

    def __init__(self, layout: BlockLayout, initial_state: Mapping[str, np.ndarray],
                 settings: RunSettings | None = None, *, costs: CostModel | None = None, **overrides: Any) -> None:
        super().__init__()
        self.resist = ResIST(layout, settings, costs=costs, **overrides)
        if self.resist.transport != "float32" or self.resist.private:
            raise ValueError(f"transport-dtype = {self.resist.transport!r}, dp = {self.resist.settings.dp!r}: the "
                             "legacy adapter sends plain float32 arrays without DP; expected 'float32' and 'none'")
        self.layout = layout
        self.keys = layout.payload_keys()
        if missing := [k for k in self.keys if k not in initial_state]:
            raise ValueError(f"initial_state lacks {len(missing)} model keys, e.g. {missing[:3]}")
        self.global_state = {k: np.asarray(initial_state[k]) for k in self.keys}
        self._cids: dict[int, str] = {}  # node id (what the strategy samples) -> legacy cid

    def __repr__(self) -> str:
        return f"LegacyResIST({len(self.layout.partitionable)} partitionable blocks)"

    def round_report(self) -> RoundReport:
        """The last round's report (the wrapped strategy's)."""
        return self.resist.round_report()

    def node_id(self, cid: str) -> int:
        """The node id of a legacy client: its cid when numeric (Flower's are node ids), else a
        stable id past every numeric one, in order of first sight."""
        node = int(cid) if cid.isdecimal() else None
        if node is None:
            known = {c: n for n, c in self._cids.items()}
            node = known.get(cid, 2**62 + len(self._cids))
        self._cids[node] = cid
        return node

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([self.global_state[k] for k in self.keys])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's round, each planned message as a ``FitIns`` of named arrays."""
        self.global_state = named_arrays({KEYS: ",".join(self.keys)}, parameters_to_ndarrays(parameters))
        client_manager.wait_for(self.resist.settings.min_available_nodes)
        clients = sorted(client_manager.all().values(), key=lambda c: cid_rank(c.cid))
        proxies = {self.node_id(str(c.cid)): c for c in clients}
        record = ArrayRecord({k: array_of(self.global_state[k]) for k in self.keys})
        messages = self.resist.configure_train(server_round, record, ConfigRecord(), ClientList(list(proxies)))
        instructions = []
        for message in messages:
            keys = list(message.content["arrays"].keys())
            config = {KEYS: ",".join(keys), **legacy_config(message.content["config"])}
            arrays = [array_view(message.content["arrays"][k]) for k in keys]
            instructions.append((proxies[message.metadata.dst_node_id], FitIns(ndarrays_to_parameters(arrays), config)))
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Screen each reply against what its client was sent (:func:`screen_fit_results`, the
        Message API's rules); the wrapped strategy settles and merges the valid ones."""
        resist = self.resist
        sent = {self._cids[n]: plan.keys for n, plan in resist.plans.items()}
        specs = {k: (v.shape, v.dtype) for k, v in self.global_state.items()}
        screened = screen_fit_results(server_round, results, failures, sent, specs, resist.settings.max_num_examples,
                                      node_of=self.node_id)
        settled = resist.settle(server_round, screened, {a.node_id: resist.plans[a.node_id]
                                                         for a in screened.accepted})
        minimum = resist.settings.min_train_replies
        if not settled.updates or too_few_replies(server_round, len(settled.updates), minimum):
            return None, dict(settled.metrics)
        touched = set().union(*(u.arrays for u in settled.updates))
        current = {k: self.global_state[k] for k in self.keys if k in touched}
        record, metrics = resist.finish(server_round, settled, current, resist.merge(current, settled.updates))
        if record is None:
            return None, dict(metrics)
        self.global_state = {k: array_view(record[k]) for k in self.keys}
        return ndarrays_to_parameters([self.global_state[k] for k in self.keys]), dict(metrics)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # the full model never goes to a client: evaluate centrally (evaluate_fn of your app)

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
