"""Client-level central differential privacy that is correct for partial updates.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` zips every reply against the full global
arrays and adds noise of standard deviation ``z * C / n`` to the mean of the ``n`` sampled
clients; under ResIST a parameter may be held by one node, and its mean then needs ``n`` times
that noise. Here (``dp='central'``, one code path for ResIST, depth tiers and FedAvg):

- each node clips its update (trained arrays minus the arrays it received, over everything it
  holds) to L2 norm ``C`` (:func:`clip_update`, Flower's ``clip_inputs_inplace``); the server
  recomputes the norm of what arrives and rejects a reply above ``C`` (:meth:`CentralDP.check`);
- the server merges with uniform weights over the *holders* ``h`` of each parameter — the nodes
  it was sent to, a fact of the server's own dealing, not of any reply: a missing or rejected
  reply counts as a zero update, so ``h`` never depends on client data — and adds Gaussian noise
  of standard deviation ``z * C / h`` to each merged parameter (Flower's
  ``add_gaussian_noise_inplace`` with ``compute_stdv(z, C, h)``): the noised sum of the clipped
  updates ``S + N(0, z^2 C^2 I)``, divided element-wise by the public ``h``;
- the privacy loss of every round is composed in Flower's RDP accountant
  (:class:`flwr.supercore.privacy_accounting.RdpAccountant`, backed by ``dp-accounting``) for the
  sampling actually used: ``n`` of ``N`` nodes drawn uniformly *without replacement* (Flower's
  node sampling is a fixed-size draw), so the neighbouring relation is *replace one* client's data,
  under which the sum's L2 sensitivity is ``2C`` and the accountant's noise multiplier is ``z / 2``.
  No amplification from the random block assignment is claimed.

docs/privacy.md derives why this is the Gaussian mechanism on the holder-rescaled sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import INFO

import numpy as np
from flwr.common import log
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, clip_inputs_inplace, compute_stdv, get_norm
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from resist_fl.core.validation import ReplyError
from resist_fl.flower.array_codec import array_view
from resist_fl.flower.round_report import RunStops

NORM_TOLERANCE = 1e-4
"""A reply's update may exceed ``C`` by this relative amount (float32 rounding of the clipping)."""
REPLACE_ONE_SENSITIVITY = 2.0
"""Replacing one client's data changes the sum of clipped updates by at most ``2C``."""


def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of the floating-point arrays: what an update is made of (integer buffers such as
    BatchNorm's ``num_batches_tracked`` count steps, not data, and keep the global value)."""
    return [k for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"]


def update_of(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``trained - received`` in float64 over the floating-point keys of ``trained``."""
    return {k: np.asarray(trained[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
            for k in float_keys(trained)}


def clip_update(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                clip: float) -> dict[str, np.ndarray]:
    """``trained`` with its update clipped to L2 norm ``clip`` over all its floating-point arrays
    (a node's side of central DP); integer arrays unchanged."""
    update = update_of(trained, received)
    keys = list(update)
    deltas = [update[k] for k in keys]
    if deltas and get_norm(deltas) > 0:
        clip_inputs_inplace(deltas, clip)
    out = dict(trained)
    for key, delta in zip(keys, deltas):
        out[key] = (np.asarray(received[key], dtype=np.float64) + delta).astype(np.asarray(trained[key]).dtype)
    return out


class CentralDP:
    """The server's side of ``dp='central'``: the norm check, the holder-calibrated noisy merge
    and the accountant.

    Parameters
    ----------
    clip : float
        ``C``, the L2 bound of every node's update.
    noise_multiplier : float
        ``z``: the sum of the clipped updates gets Gaussian noise of standard deviation ``z * C``.
    delta : float
        The delta epsilon is reported at.
    target_epsilon : float, optional
        Stop before the round whose release would take epsilon past it.
    """

    def __init__(self, clip: float, noise_multiplier: float, delta: float = 1e-5,
                 target_epsilon: float | None = None) -> None:
        for name, value in (("dp-clip", clip), ("dp-noise-multiplier", noise_multiplier)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} = {value!r}: expected a positive finite number")
        if not 0 < delta < 1:
            raise ValueError(f"dp-delta = {delta!r}: expected a number in (0, 1)")
        if target_epsilon is not None and not 0 < target_epsilon < math.inf:
            raise ValueError(f"dp-target-epsilon = {target_epsilon!r}: expected a positive number (or none)")
        self.clip, self.noise_multiplier, self.delta = float(clip), float(noise_multiplier), float(delta)
        self.target_epsilon = target_epsilon
        self.population: int | None = None  # N, fixed at the first release (the nodes connected then)
        self.accountant: RdpAccountant | None = None

    # -- a reply --------------------------------------------------------------------------------
    def check(self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
        """The L2 norm of a reply's update; ReplyError when it exceeds ``C`` (the node did not clip)."""
        norm = get_norm(list(update_of(trained, received).values()))
        if not norm <= self.clip * (1 + NORM_TOLERANCE):
            raise ReplyError(f"its update has L2 norm {norm:.6g}, above dp-clip = {self.clip:g} "
                             "(central DP: every node clips its update to dp-clip before sending)")
        return norm

    def reply_check(self, global_record):
        """The screening check of a round whose global arrays are ``global_record``: a reply whose
        update exceeds ``C`` is rejected (:meth:`check`)."""
        return lambda reply: self.check(reply.update, {k: array_view(global_record[k]) for k in reply.update})

    # -- the merge -------------------------------------------------------------------------------
    def noise_std(self, holders: int) -> float:
        """Standard deviation of the noise on a parameter merged over ``holders`` nodes."""
        return compute_stdv(self.noise_multiplier, self.clip, holders)

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
              holders: Mapping[str, int]) -> dict[str, np.ndarray]:
        """The noisy merge of every floating-point key in ``holders`` (the keys the round sent):
        ``current + (sum of the accepted clipped updates holding it + N(0, (zC)^2)) / h``; the other
        keys (integer buffers, keys nobody was sent) keep the global array."""
        merged = dict(current)
        by_holders: dict[int, list[str]] = {}
        for key, count in holders.items():
            if count >= 1 and np.asarray(current[key]).dtype.kind == "f":
                by_holders.setdefault(int(count), []).append(key)
        for count, keys in sorted(by_holders.items()):
            means = []
            for key in keys:
                base = np.asarray(current[key], dtype=np.float64)
                holding = [np.asarray(u[key], dtype=np.float64) for u in updates if key in u]
                means.append((sum(holding, np.zeros_like(base)) - len(holding) * base) / count)
            add_gaussian_noise_inplace(means, self.noise_std(count))  # Flower's helper: N(0, (zC/h)^2) each
            for key, mean in zip(keys, means):
                merged[key] = (np.asarray(current[key], dtype=np.float64) + mean).astype(np.asarray(current[key]).dtype)
        return merged

    # -- accounting ------------------------------------------------------------------------------
    def event(self, sampled: int, connected: int) -> GaussianPrivacyEvent:
        """This round's release: ``sampled`` of the population drawn without replacement. With more
        nodes connected than the population the sampling rate used is the population's (larger,
        so epsilon is not understated); with fewer, the sample is scaled up to the same rate."""
        if self.population is None:
            self.population = max(1, int(connected))
            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=self.delta, population_size=self.population,
                neighboring_relation=NeighboringRelation.REPLACE_ONE,
                sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
        size = sampled if connected >= self.population else math.ceil(sampled * self.population / max(1, connected))
        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier / REPLACE_ONE_SENSITIVITY,
                                    sample_size=max(1, min(self.population, int(size))),
                                    population_size=self.population)

    def stop_if_exceeded(self, sampled: int, connected: int, run_round: int) -> None:
        """:class:`RunStops` before round ``run_round`` when its release would exceed the target."""
        if self.would_exceed(sampled, connected):
            raise RunStops(f"dp-target-epsilon = {self.target_epsilon:g} would be exceeded by round {run_round} "
                           f"(epsilon now {self.epsilon():.4f} at delta {self.delta:g})")

    def release_row(self, sampled: int, connected: int) -> dict:
        """Compose this round's release; the row's ``epsilon``, ``dp-delta`` and ``dp-state``."""
        epsilon = self.release(sampled, connected)
        log(INFO, "round released under central DP: epsilon %.4f at delta %g (z = %g, C = %g, %d of %d nodes)",
            epsilon, self.delta, self.noise_multiplier, self.clip, sampled, self.population)
        return {"epsilon": epsilon, "dp-delta": self.delta, "dp-state": self.state()}

    def would_exceed(self, sampled: int, connected: int) -> bool:
        """Whether releasing this round would take epsilon past ``target_epsilon``."""
        if self.target_epsilon is None:
            return False
        event = self.event(sampled, connected)
        return self.accountant.would_exceed(event, max_epsilon=self.target_epsilon)

    def release(self, sampled: int, connected: int) -> float:
        """Compose this round's release; return epsilon after it."""
        event = self.event(sampled, connected)
        self.accountant.compose(event)
        return self.epsilon()

    def epsilon(self) -> float:
        """Epsilon at ``delta`` of every round released so far (0 before any)."""
        return 0.0 if self.accountant is None or not self.accountant.num_releases else \
            self.accountant.get_epsilon(self.delta)

    def state(self) -> dict:
        """The accountant's state (JSON), for a resumed run to continue from."""
        return {"population": self.population,
                "accountant": None if self.accountant is None else self.accountant.state_dict()}

    def restore(self, state: Mapping | None) -> None:
        """Continue from :meth:`state` (a resumed run's epsilon continues, never restarts)."""
        if not state or state.get("population") is None:
            return
        self.population = int(state["population"])
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=self.delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE, sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
        if state.get("accountant"):
            self.accountant.load_state_dict(dict(state["accountant"]))
        log(INFO, "resist-fl: central DP continues at epsilon %.4f after %d releases", self.epsilon(),
            self.accountant.num_releases)
