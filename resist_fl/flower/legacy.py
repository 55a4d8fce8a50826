"""ResIST for Flower's legacy ``Strategy`` API (``configure_fit`` / ``aggregate_fit``).

Most published Flower baselines use ``ServerApp(server_fn=...)`` with a
``flwr.server.strategy.Strategy`` and ``NumPyClient``s. :class:`LegacyResIST` is a thin adapter
over the same core as :class:`resist_fl.flower.resist.ResIST`: the same node sampling draw and
sub-network sampler for a (seed, round), the same reply checks
(:func:`~resist_fl.core.validation.check_update`) and the same merge
(:func:`~resist_fl.core.aggregation.merge_partial`, then the server step).

Parameters travel as lists in the legacy API, so the key names travel with them: every
``FitIns`` config holds ``keys``, the comma-separated state_dict names of its arrays in order,
and a reply must return exactly that many arrays in that order (:func:`named_arrays` reads them
on the client). The global parameters are ordered by ``layout.payload_keys()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from resist_fl.core.aggregation import check_server_lr, merge_partial, server_step, update_weights
from resist_fl.core.decomposition import BlockLayout, round_rng, sample_subnetworks
from resist_fl.core.validation import ReplyError, check_num_examples, check_update
from resist_fl.flower.node_sampling import sample_positions
from resist_fl.flower.reply_screening import refuse_non_finite

KEYS = "keys"
"""Fit-config entry: the comma-separated names of the arrays, in order."""


def named_arrays(config: Mapping[str, Scalar], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a ``FitIns`` (or a reply to it) by name; ValueError if the counts differ."""
    keys = str(config[KEYS]).split(",")
    if len(keys) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(keys)} names in the fit config's {KEYS!r}")
    return dict(zip(keys, arrays))


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
        clients = sorted(client_manager.all().values(), key=lambda c: int(c.cid))
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
        """Check each reply against what its client was sent, and merge the valid ones."""
        updates, examples = [], []
        for proxy, res in sorted(results, key=lambda r: int(r[0].cid)):
            try:
                keys = self._sent.get(proxy.cid)
                if keys is None:
                    raise ReplyError("this client was not sent a sub-network this round")
                arrays = parameters_to_ndarrays(res.parameters)
                if len(arrays) != len(keys):
                    raise ReplyError(f"{len(arrays)} arrays for the {len(keys)} it was sent")
                expected = {k: (self.global_state[k].shape, self.global_state[k].dtype) for k in keys}
                updates.append(check_update(dict(zip(keys, arrays)), expected))
                examples.append(check_num_examples(res.num_examples, self.max_num_examples))
            except ReplyError as err:
                log(WARNING, "round %d: reply of client %s dropped: %s", server_round, proxy.cid, err)
        metrics: dict[str, Scalar] = {"replies-accepted": len(updates),
                                      "replies-rejected": len(results) - len(updates), "replies-failed": len(failures)}
        if not updates:
            return None, metrics
        current = {k: self.global_state[k] for k in self.keys if any(k in u for u in updates)}
        merged = server_step(current, merge_partial(current, updates, update_weights(examples, self.weighting)),
                             self.server_lr)
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
