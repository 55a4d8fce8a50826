"""Client-level central differential privacy that is correct for partial updates.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` zips every reply against the full global
arrays and adds noise of standard deviation ``z * C / n`` to the mean of the ``n`` sampled
clients; under ResIST a parameter may be held by one node, and its mean then needs ``n`` times
that noise. Here (``dp='central'``, one code path for every method):

- each node clips its update (trained arrays minus the arrays it received, over everything it
  holds) to L2 norm ``C`` (:func:`clip_update`, Flower's ``clip_inputs_inplace``); the server
  recomputes the norm of what arrives, rejects a reply above ``C`` (:meth:`CentralDP.check`) and
  clips what it accepts to exactly ``C`` once more (a float32 reply may exceed it by rounding;
  the accountant assumes ``C``, so the sum's sensitivity must be ``C``, not ``C(1 + 1e-4)``);
- the server merges with uniform weights over the *holders* ``h`` of each parameter — the nodes
  it was sent to, a fact of the server's own dealing, not of any reply: a missing or rejected
  reply counts as a zero update, so ``h`` never depends on client data — and adds Gaussian noise
  of standard deviation ``z * C / h`` to each merged parameter: the noised sum of the clipped
  updates ``S + N(0, z^2 C^2 I)``, divided element-wise by the public ``h``. The noise comes from a
  generator seeded from OS entropy (:mod:`resist_fl.core.secure_random`), never from the run seed
  or NumPy's global RNG (Flower's ``add_gaussian_noise_inplace`` draws from the latter, which the
  ServerApp seeds from the run config: the noise could be replayed and removed);
- accounting (``dp-sampling``):

  * ``public`` (default): which nodes take part in a round is drawn from the run seed and written
    to ``nodes.jsonl``, so it is public and gives **no amplification by subsampling** (Flower
    1.42's own accounted wrapper refuses amplification for the same reason). The neighbouring
    relation is *add/remove one node's data* — with the participants known, a node without data
    sends a zero update (a missing or rejected reply is merged as one), so one node moves the sum
    of clipped updates by at most ``C`` and the accountant's multiplier is ``z``. Each node's
    epsilon composes the rounds it was actually sent a model in (participation is
    data-independent, so this is that node's guarantee; Flower's RDP accountant with
    ``SamplingMethod.NO_AMPLIFICATION``); the run's ``epsilon`` is the worst node's, and
    ``epsilon-every-round`` — a node in every round — is what ``dp-target-epsilon`` plans against;
  * ``secret``: participants are drawn from OS entropy and written nowhere the run publishes; only
    then is the amplified accountant used: ``n`` of ``N`` drawn without replacement (Flower's node
    sampling is a fixed-size draw), whose analysis is under *replace one* node's data, where the
    sum's sensitivity is ``2C`` and the accountant's multiplier ``z / 2``;
- adaptive clipping (``dp-clip-quantile`` > 0; Andrew, Thakkar, McMahan, Ramaswamy, "Differentially
  Private Learning with Adaptive Clipping", NeurIPS 2021, the geometric update of its Algorithm 1,
  as Flower's and TFF's adaptive-clipping aggregators do it): every node also reports whether its
  unclipped update norm was at most ``C`` (one bit); the server adds ``N(0, sigma_b^2)`` to the count
  of such bits (a missing or rejected reply is a zero update, norm 0, so it counts as one) and moves
  ``C <- C * exp(-eta * (noisy fraction - gamma))``. The count is a second Gaussian mechanism of
  sensitivity 1; both compose into one Gaussian of multiplier ``(z^-2 + sigma_b^-2)^-1/2`` per
  round (``((z/2)^-2 + sigma_b^-2)^-1/2`` under replace-one), which the accountant charges. No
  amplification from the random block assignment is claimed.

docs/privacy.md states per mode the privacy unit, the neighbouring relation, what is released and
what is outside the guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any
from logging import INFO

import numpy as np
from flwr.common import log
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from resist_fl.core.secure_random import secure_numpy_generator
from resist_fl.core.validation import ReplyError
from resist_fl.flower.round_report import RunStops
from resist_fl.run.settings import RunSettings, settings_of

NORM_TOLERANCE = 1e-4
"""A reply's update may exceed ``C`` by this relative amount (float32 rounding of the clipping);
the server then clips it to exactly ``C`` before the merge."""
REPLACE_ONE_SENSITIVITY = 2.0
"""Replacing one client's data changes the sum of clipped updates by at most ``2C``."""
BELOW_CLIP = "dp-below-clip"
"""Reply metric under central DP: 1 if the node's unclipped update norm was at most ``dp-clip``, else 0
(the bit adaptive clipping counts; used only through the noised count)."""
DEFAULT_COUNT_NOISE_PER_NODE = 1 / 20
"""Andrew et al.'s recommendation for the count noise: ``sigma_b = (expected nodes per round) / 20``."""


def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of the floating-point arrays: what an update is made of (integer buffers such as
    BatchNorm's ``num_batches_tracked`` count steps, not data, and keep the global value)."""
    return [k for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"]


def update_of(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``trained - received`` in float64 over the floating-point keys of ``trained``."""
    return {k: np.asarray(trained[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
            for k in float_keys(trained)}


def below_clip(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], clip: float) -> int:
    """1 if the update ``trained - received`` has L2 norm at most ``clip`` (before clipping), else 0."""
    return int(get_norm(list(update_of(trained, received).values())) <= clip)


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


@lru_cache(maxsize=4096)
def unamplified_epsilon(releases: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` Gaussian releases of multiplier ``noise_multiplier``
    without amplification, add/remove one node (Flower's RDP accountant, ``NO_AMPLIFICATION``)."""
    if releases <= 0:
        return 0.0
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=1, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=1, population_size=1),
                       count=int(releases))
    return float(accountant.get_epsilon(delta))


class CentralDP:
    """The server's side of ``dp='central'``: the norm check, the holder-calibrated noisy merge,
    adaptive clipping and the accountant.

    Built from the run's ``dp-*`` settings (:class:`~resist_fl.run.settings.RunSettings`, where their
    defaults and bounds live): ``dp-clip`` ``C`` bounds every node's update (the initial bound under
    adaptive clipping); the sum of the clipped updates gets Gaussian noise of standard deviation
    ``dp-noise-multiplier x C``; epsilon is reported at ``dp-delta``; ``dp-target-epsilon`` stops the run
    before a release would pass it; ``dp-sampling`` is ``public`` (participants follow from the seed and
    are written out: no amplification) or ``secret`` (OS entropy, never written: the amplified
    accountant); ``dp-clip-quantile`` > 0 clips adaptively at rate ``dp-clip-lr`` with noise
    ``dp-clip-count-noise`` on the count (0: the round's sample size / 20, fixed at the first round).
    ``overrides`` (field names) change a setting, validated like any run config.
    """

    def __init__(self, settings: RunSettings | None = None, **overrides: Any) -> None:
        if settings is not None and not isinstance(settings, RunSettings):
            raise TypeError(f"CentralDP({settings!r}): expected CentralDP(settings) or field overrides such as "
                            "CentralDP(dp_clip=1.0, dp_noise_multiplier=1.0)")
        # without settings: a valid central-DP run's (RunSettings refuses dp='central' with example weights)
        central = {"dp": "central", "weighting": "uniform"}
        settings = settings_of(settings, {**central, **overrides} if settings is None else overrides)
        if settings.dp != "central":
            raise ValueError(f"dp = {settings.dp!r}: CentralDP is the mechanism of dp='central'")
        self.clip, self.noise_multiplier, self.delta = settings.dp_clip, settings.dp_noise_multiplier, settings.dp_delta
        self.target_epsilon = settings.dp_target_epsilon or None
        self.sampling = settings.dp_sampling
        self.clip_quantile, self.clip_lr = settings.dp_clip_quantile, settings.dp_clip_lr
        self.count_noise = settings.dp_clip_count_noise or None  # resolved at the first round when 0
        self.rng = secure_numpy_generator()  # the noise: OS entropy, never the run seed
        self.releases = 0
        self.participations: dict[str, int] = {}  # node key -> rounds it was sent a model in (public)
        self.population: int | None = None  # N under secret sampling, fixed at the first release
        self.amplified: RdpAccountant | None = None

    @property
    def adaptive(self) -> bool:
        return self.clip_quantile > 0

    @property
    def secret(self) -> bool:
        return self.sampling == "secret"

    def accounted_multiplier(self) -> float:
        """The Gaussian multiplier one round costs: ``z`` (``z / 2`` under secret sampling's
        replace-one relation), composed with the count's ``sigma_b`` under adaptive clipping."""
        z = self.noise_multiplier / (REPLACE_ONE_SENSITIVITY if self.secret else 1.0)
        if not self.adaptive:
            return z
        return (z ** -2 + self.count_noise ** -2) ** -0.5

    # -- a reply --------------------------------------------------------------------------------
    def check(self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
        """The L2 norm of a reply's update; ReplyError when it exceeds ``C`` (the node did not clip)."""
        norm = get_norm(list(update_of(trained, received).values()))
        if not norm <= self.clip * (1 + NORM_TOLERANCE):
            raise ReplyError(f"its update has L2 norm {norm:.6g}, above dp-clip = {self.clip:g} "
                             "(central DP: every node clips its update to dp-clip before sending)")
        return norm

    def check_reply(self, update: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                    metrics: Mapping[str, object]) -> None:
        """Screening under central DP: a reply whose update (``update`` minus the ``received``
        arrays) exceeds ``C`` is rejected (:meth:`check`), and under adaptive clipping one without
        its bit (``dp-below-clip`` 0 or 1)."""
        self.check(update, {k: received[k] for k in update})
        if self.adaptive and metrics.get(BELOW_CLIP) not in (0, 1):
            raise ReplyError(f"{BELOW_CLIP} = {metrics.get(BELOW_CLIP)!r}: adaptive clipping needs "
                             "0 or 1 (whether the unclipped update norm was at most dp-clip)")

    # -- the merge -------------------------------------------------------------------------------
    def noise_std(self, holders: int) -> float:
        """Standard deviation of the noise on a parameter merged over ``holders`` nodes."""
        return compute_stdv(self.noise_multiplier, self.clip, holders)

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
              holders: Mapping[str, int | np.ndarray],
              holdings: Sequence[Mapping[str, Any]] | None = None) -> dict[str, np.ndarray]:
        """The noisy merge of every floating-point key in ``holders`` (what the round sent, with its
        holder count: a number, or per element for sliced tensors):
        ``current + (sum of the accepted updates holding it, each clipped to C, + N(0, (zC)^2)) / h``
        element-wise over the elements with ``h >= 1``; everything else keeps the global value.
        ``holdings`` gives, per update, the elements it holds of each key (None or absent: whole,
        :mod:`resist_fl.core.holders`)."""
        merged = dict(current)
        keys = [k for k, count in holders.items()
                if np.any(np.asarray(count) >= 1) and np.asarray(current[k]).dtype.kind == "f"]
        base = {k: np.asarray(current[k], dtype=np.float64) for k in keys}
        total = {k: np.zeros_like(base[k]) for k in keys}
        for number, update in enumerate(updates):  # each accepted update clipped to exactly C over what it holds
            where = holdings[number] if holdings is not None else {}
            held = [k for k in keys if k in update]
            deltas = [np.asarray(update[k], dtype=np.float64) - (base[k] if where.get(k) is None else base[k][where[k]])
                      for k in held]
            if deltas and get_norm(deltas) > self.clip:
                clip_inputs_inplace(deltas, self.clip)
            for key, delta in zip(held, deltas):
                if where.get(key) is None:
                    total[key] += delta
                else:
                    total[key][where[key]] += delta
        for key in keys:
            count = np.asarray(holders[key], dtype=np.float64)
            held = count >= 1
            noise = self.rng.normal(0.0, self.noise_multiplier * self.clip, total[key].shape)
            noisy = (total[key] + noise) / np.where(held, count, 1.0)
            merged[key] = np.where(held, base[key] + noisy, base[key]).astype(np.asarray(current[key]).dtype)
        return merged

    # -- accounting ------------------------------------------------------------------------------
    def epsilon_after(self, releases: int) -> float:
        """Epsilon of a node sent a model in ``releases`` rounds (public sampling: no amplification)."""
        if not releases:  # (under adaptive clipping the count's noise is set by the first release)
            return 0.0
        return unamplified_epsilon(int(releases), self.accounted_multiplier(), self.delta)

    def node_epsilon(self, key: str) -> float:
        """A node's epsilon so far: the rounds it was in (public), the run's amplified epsilon (secret)."""
        return self.epsilon() if self.secret else self.epsilon_after(self.participations.get(key, 0))

    def epsilon(self) -> float:
        """The run's epsilon at ``delta``: the worst node's (0 before any release)."""
        if self.secret:
            return 0.0 if self.amplified is None or not self.amplified.num_releases else \
                float(self.amplified.get_epsilon(self.delta))
        return self.epsilon_after(max(self.participations.values(), default=0))

    def every_round_epsilon(self) -> float:
        """The planning bound: a node sent a model in every round released so far."""
        return self.epsilon() if self.secret else self.epsilon_after(self.releases)

    def _resolve_count_noise(self, sampled: int) -> None:
        if self.adaptive and self.count_noise is None:
            self.count_noise = max(1, int(sampled)) * DEFAULT_COUNT_NOISE_PER_NODE

    def _amplified_event(self, sampled: int, connected: int) -> GaussianPrivacyEvent:
        """Secret sampling: ``sampled`` of the population drawn without replacement. With more nodes
        connected than the population the rate used is the population's (larger, so epsilon is not
        understated); with fewer, the sample is scaled up to the same rate."""
        if self.population is None:
            self.population = max(1, int(connected))
            self.amplified = RdpAccountant(self._amplified_config())
        size = sampled if connected >= self.population else math.ceil(sampled * self.population / max(1, connected))
        return GaussianPrivacyEvent(noise_multiplier=self.accounted_multiplier(),
                                    sample_size=max(1, min(self.population, int(size))),
                                    population_size=self.population)

    def _amplified_config(self) -> PrivacyConfig:
        return PrivacyConfig(target_delta=self.delta, population_size=self.population,
                             neighboring_relation=NeighboringRelation.REPLACE_ONE,
                             sampling_method=SamplingMethod.WITHOUT_REPLACEMENT)

    def would_exceed(self, sampled: int, connected: int) -> bool:
        """Whether releasing one more round would take the planning bound past ``target_epsilon``."""
        self._resolve_count_noise(sampled)
        if self.target_epsilon is None:
            return False
        if self.secret:
            return self.amplified_would_exceed(sampled, connected)
        return self.epsilon_after(self.releases + 1) > self.target_epsilon

    def amplified_would_exceed(self, sampled: int, connected: int) -> bool:
        event = self._amplified_event(sampled, connected)
        return self.amplified.would_exceed(event, max_epsilon=self.target_epsilon)

    def stop_if_exceeded(self, sampled: int, connected: int, run_round: int) -> None:
        """:class:`RunStops` before round ``run_round`` when its release would exceed the target."""
        if self.would_exceed(sampled, connected):
            raise RunStops(f"dp-target-epsilon = {self.target_epsilon:g} would be exceeded by round {run_round} "
                           f"(epsilon now {self.every_round_epsilon():.4f} for a node in every round, at delta "
                           f"{self.delta:g})")

    def release_row(self, participants: Sequence[str], connected: int, below: Sequence[int] = ()) -> dict:
        """Charge this round's release to the nodes it was sent to (``participants``: their stable
        keys), move an adaptive clip by the noised count of ``below`` (the accepted replies' bits;
        every other participant counts as below: a zero update); the row's privacy figures. A round
        sent to nobody releases nothing and is charged nothing: its figures are the standing ones."""
        if not participants:
            return self.figures()
        self._resolve_count_noise(len(participants))
        used_clip = self.clip
        self.releases += 1
        if self.secret:
            event = self._amplified_event(len(participants), connected)  # creates the accountant at first
            self.amplified.compose(event)
        else:
            for key in participants:
                self.participations[key] = self.participations.get(key, 0) + 1
        if self.adaptive:
            self.clip = self.next_clip(len(participants), below)
        log(INFO, "round released under central DP: epsilon %.4f (worst node), %.4f for a node in every round, "
            "at delta %g (z = %g, C = %g, %d nodes, %s sampling)", self.epsilon(), self.every_round_epsilon(),
            self.delta, self.noise_multiplier, used_clip, len(participants), self.sampling)
        return self.figures(used_clip)

    def figures(self, used_clip: float | None = None) -> dict:
        """A row's privacy figures: epsilon so far, the clip the round used (the current one when none was
        used) and the accountant's state, which every row carries so that a run resumed after any round
        (one sent to nobody included) continues its epsilon from it."""
        return {"epsilon": self.epsilon(), "epsilon-every-round": self.every_round_epsilon(), "dp-delta": self.delta,
                "dp-clip": self.clip if used_clip is None else used_clip, "dp-state": self.state()}

    def next_clip(self, sent: int, below: Sequence[int]) -> float:
        """Andrew et al.'s geometric step: ``C * exp(-eta * (b - gamma))`` with ``b`` the noised
        fraction of the ``sent`` nodes whose update norm was at most ``C`` (clamped to [0, 1])."""
        count = sum(int(b) for b in below) + (sent - len(below)) + self.rng.normal(0.0, self.count_noise)
        fraction = min(1.0, max(0.0, count / sent))
        return self.clip * math.exp(-self.clip_lr * (fraction - self.clip_quantile))

    def state(self) -> dict:
        """The accountant's state (JSON), for a resumed run to continue from."""
        return {"releases": self.releases, "clip": self.clip, "count-noise": self.count_noise,
                "participations": dict(self.participations), "population": self.population,
                "accountant": None if self.amplified is None else self.amplified.state_dict()}

    def restore(self, state: Mapping | None) -> None:
        """Continue from :meth:`state` (a resumed run's epsilon continues, never restarts)."""
        if not state:
            return
        self.releases = int(state.get("releases", 0))
        self.clip = float(state.get("clip", self.clip))
        if state.get("count-noise") is not None:
            self.count_noise = float(state["count-noise"])
        self.participations = {str(k): int(v) for k, v in dict(state.get("participations") or {}).items()}
        if state.get("population") is not None:
            self.population = int(state["population"])
            self.amplified = RdpAccountant(self._amplified_config())
            if state.get("accountant"):
                self.amplified.load_state_dict(dict(state["accountant"]))
        log(INFO, "resist-fl: central DP continues after %d releases at epsilon %.4f (worst node)",
            self.releases, self.epsilon())
