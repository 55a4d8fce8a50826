"""ResIST for Flower's legacy ``Strategy`` API (``configure_fit`` / ``aggregate_fit``).

Most published Flower baselines use ``ServerApp(server_fn=...)`` with a
``flwr.server.strategy.Strategy`` and ``NumPyClient``s. :class:`LegacyResIST` is a thin adapter
over the same core as :class:`resist_fl.flower.resist.ResIST`: the same node sampling draw and
sub-network sampler for a (seed, round), the same reply screening (:func:`screen_fit_results`:
the rules, counts and log lines of :mod:`resist_fl.flower.reply_screening`) and the same merge
(:func:`~resist_fl.core.aggregation.merge_partial`, then the server step).

Parameters travel as lists in the legacy API, so the key names travel with them: every
``FitIns`` config holds ``keys``, the comma-separated state_dict names of its arrays in order,
and a reply must return exactly that many arrays in that order (:func:`named_arrays` reads them
on the client). The global parameters are ordered by ``layout.payload_keys()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO

import numpy as np
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from resist_fl.core.aggregation import check_server_lr, merge_partial, server_step, update_weights
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.npy_bytes import NpyError, read_npy
from resist_fl.core.validation import ReplyError
from resist_fl.flower.node_sampling import sample_positions
from resist_fl.flower.reply_screening import (
    Accepted,
    ScreenedReplies,
    check_reply_arrays,
    check_reply_metrics,
    refuse_non_finite,
)

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
                       specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], max_num_examples: int) -> ScreenedReplies:
    """Screen the legacy replies of a round with the Message API's rules, counts and log lines.

    One reply per client and the first one counts (a second ``(proxy, FitRes)`` of the same
    ``cid`` is rejected); a reply must come from a client sent a sub-network this round, be a
    ``FitRes`` with status OK, carry exactly the arrays it was sent (decoded strictly) and pass
    :func:`check_reply_metrics` / :func:`check_reply_arrays` with ``num_examples`` as
    ``num-examples``. ``failures`` are counted as failed. Total: whatever ``results`` and
    ``failures`` hold, each entry is accepted, rejected or failed, never raised. The accepted
    replies are in client order (:func:`cid_rank`).
    """
    out = ScreenedReplies()
    answered: set[str] = set()
    for entry in results if isinstance(results, (list, tuple)) else ():
        cid = "?"
        try:
            proxy, res = entry
            cid = str(proxy.cid)
            if cid not in sent:
                raise ReplyError("this client was not sent a sub-network this round")
            if cid in answered:
                raise ReplyError("a second reply from the same client (the first one counts)")
            answered.add(cid)
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
            out.accepted.append(Accepted(cid, None, update, metrics))
        except Exception as err:  # noqa: BLE001 - screening is total
            out.reject(server_round, cid, err)
    for failure in failures if isinstance(failures, (list, tuple)) else ():
        if isinstance(failure, tuple) and len(failure) == 2:
            proxy, res = failure
            cid = str(getattr(proxy, "cid", "?"))
            status = getattr(res, "status", None)
            if cid in sent and cid not in answered:
                answered.add(cid)
            out.fail(server_round, cid, getattr(status, "code", "?"), getattr(status, "message", res))
        else:
            out.fail(server_round, "?", type(failure).__name__, failure)
    out.missing = len(set(sent) - answered)
    out.accepted.sort(key=lambda a: cid_rank(a.node_id))
    return out


class LegacyResIST(Strategy):
    """ResIST as a legacy Flower ``Strategy``.

    Parameters
    ----------
    layout : BlockLayout
        Shared keys and partitionable blocks of the global model.
    initial_state : mapping of str to ndarray
        The global model's initial arrays (at least ``layout.payload_keys()``).
    fraction_fit, min_fit_clients, min_available_clients
        Sample ``max(int(n * fraction_fit), min_fit_clients)`` of the n connected clients,
        after waiting for ``min_available_clients``.
    min_blocks_per_site, weighting, seed, server_lr, max_num_examples
        As for :class:`resist_fl.flower.resist.ResIST`.
    """

    def __init__(self, layout: BlockLayout, initial_state: Mapping[str, np.ndarray], *, fraction_fit: float = 1.0,
                 min_fit_clients: int = 2, min_available_clients: int = 2, min_blocks_per_site: int = 0,
                 weighting: str = "examples", seed: int = 0, server_lr: float = 1.0,
                 max_num_examples: int = 10_000_000) -> None:
        super().__init__()
        update_weights([], weighting)
        check_server_lr(server_lr)
        self.layout = layout
        self.keys = layout.payload_keys()
        if missing := [k for k in self.keys if k not in initial_state]:
            raise ValueError(f"initial_state lacks {len(missing)} model keys, e.g. {missing[:3]}")
        self.global_state = {k: np.asarray(initial_state[k]) for k in self.keys}
        self.fraction_fit, self.min_fit_clients = fraction_fit, min_fit_clients
        self.min_available_clients = min_available_clients
        self.min_blocks_per_site, self.weighting = min_blocks_per_site, weighting
        self.seed, self.server_lr, self.max_num_examples = seed, server_lr, max_num_examples
        self._sent: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"LegacyResIST({len(self.layout.partitionable)} partitionable blocks)"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([self.global_state[k] for k in self.keys])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients as ResIST samples nodes and send each its sub-network's named arrays."""
        self.global_state = named_arrays({KEYS: ",".join(self.keys)}, parameters_to_ndarrays(parameters))
        client_manager.wait_for(self.min_available_clients)
        clients = sorted(client_manager.all().values(), key=lambda c: cid_rank(c.cid))
        rng = round_rng(self.seed, server_round)
        sampled = [clients[i] for i in sample_positions(len(clients), self.fraction_fit, self.min_fit_clients, rng)]
        groups = sample_subnetworks(self.layout.partitionable, len(sampled), self.min_blocks_per_site, rng)
        self._sent = {}
        instructions = []
        for client, blocks in zip(sampled, groups):
            keys = self.layout.payload_keys(blocks)
            self._sent[client.cid] = keys
            config: dict[str, Scalar] = {KEYS: ",".join(keys), "blocks": ",".join(blocks), "server-round": server_round}
            instructions.append((client, FitIns(ndarrays_to_parameters([self.global_state[k] for k in keys]), config)))
        log(INFO, "configure_fit: round %d, %d of %d clients, sub-network depths %s", server_round, len(sampled),
            len(clients), [len(g) for g in groups])
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Screen each reply against what its client was sent (:func:`screen_fit_results`, the
        Message API's rules), and merge the valid ones."""
        specs = {k: (v.shape, v.dtype) for k, v in self.global_state.items()}
        screened = screen_fit_results(server_round, results, failures, self._sent, specs, self.max_num_examples)
        metrics: dict[str, Scalar] = {**screened.round_metrics(), "merge-refused": 0}
        updates = [a.update for a in screened.accepted]
        if not updates:
            return None, metrics
        current = {k: self.global_state[k] for k in self.keys if any(k in u for u in updates)}
        weights = update_weights([a.num_examples for a in screened.accepted], self.weighting)
        merged = server_step(current, merge_partial(current, updates, weights), self.server_lr)
        if refuse_non_finite(server_round, merged, metrics):
            return None, metrics
        self.global_state.update(merged)
        return ndarrays_to_parameters([self.global_state[k] for k in self.keys]), metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # the full model never goes to a client: evaluate centrally (evaluate_fn of your app)

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
