"""A node's own privacy budget under local DP: node config that no run config can loosen.

Under ``dp='local'`` the noise multiplier, clip, batch size, steps and delta are the run config's,
chosen by whoever launches the run, which local DP does not trust. A node that sets
``dp-max-epsilon`` in its node config (``flower-supernode ... --node-config "... dp-max-epsilon=8"``)
trains only under ``dp='local'`` and only a round after which its epsilon stays within that budget,
at its own delta (``dp-max-epsilon-delta``, default 1e-5, never the run's). Its epsilon composes every
DP-SGD step recorded in every ledger of its partition in its ledger directory (:mod:`dp_ledger`):
every run, under any ``run-name``, so a new run name does not start it again at zero. A round that
would exceed the budget is refused before training (the node replies with an error; the server
counts it as failed), and so is a message of a run without local DP, and every evaluate message (a
federated evaluation releases losses no noise covers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from resist_fl.node.dp_ledger import History, partition_ledgers, read_history

MAX_EPSILON_KEY = "dp-max-epsilon"
DELTA_KEY = "dp-max-epsilon-delta"
DEFAULT_DELTA = 1e-5


class BudgetRefused(RuntimeError):
    """This node's own privacy budget refuses the message: it trains nothing and sends nothing."""


@dataclass(frozen=True)
class NodeBudget:
    """``epsilon`` at ``delta``: the most this node spends on its examples, over every run."""

    epsilon: float
    delta: float

    @classmethod
    def of(cls, node_config: Mapping[str, object]) -> NodeBudget | None:
        """The node config's budget (None without ``dp-max-epsilon``); ValueError naming a bad value."""
        if MAX_EPSILON_KEY not in node_config:
            if DELTA_KEY in node_config:
                raise ValueError(f"node config {DELTA_KEY} = {node_config[DELTA_KEY]!r} without {MAX_EPSILON_KEY}: "
                                 "set both, or neither")
            return None
        epsilon, delta = node_config[MAX_EPSILON_KEY], node_config.get(DELTA_KEY, DEFAULT_DELTA)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"node config {MAX_EPSILON_KEY} = {epsilon!r}: expected a number > 0")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"node config {DELTA_KEY} = {delta!r}: expected a number in (0, 1)")
        if not isinstance(node_config.get("partition-id"), int) or isinstance(node_config.get("partition-id"), bool):
            raise ValueError(f"node config {MAX_EPSILON_KEY} needs an integer partition-id: the budget is kept per "
                             "partition, across runs and restarts")
        return cls(float(epsilon), float(delta))

    def check_train(self, dp: str, spent: History, round_cost: tuple[float, float, int]) -> float:
        """The node's epsilon after a round costing ``round_cost`` (noise multiplier, sample rate, steps)
        on top of ``spent``; BudgetRefused when the run is not under local DP or the budget would be
        exceeded."""
        if dp != "local":
            raise BudgetRefused(f"node config {MAX_EPSILON_KEY} = {self.epsilon:g}: this node trains only under "
                                f"dp='local', and the run has dp = {dp!r}")
        after = epsilon_of([*spent, round_cost], self.delta)
        if after > self.epsilon:
            z, rate, steps = round_cost
            raise BudgetRefused(f"node config {MAX_EPSILON_KEY} = {self.epsilon:g} (at delta {self.delta:g}): this "
                                f"round (noise multiplier {z:g}, sample rate {rate:.4g}, {steps} steps) would bring "
                                f"the node's epsilon to {after:.4g}; it trains no more")
        return after

    def refuse_evaluate(self) -> None:
        raise BudgetRefused(f"node config {MAX_EPSILON_KEY} = {self.epsilon:g}: this node answers no evaluate "
                            "message (a federated evaluation releases losses no noise covers)")


def spent_history(node_config: Mapping[str, object]) -> History:
    """Every composition in every ledger of this node's partition under its ledger directory (every run)."""
    return [entry for path in partition_ledgers(node_config) for entry in read_history(path)]


def epsilon_of(history: History, delta: float) -> float:
    """Opacus' RDP accountant's epsilon at ``delta`` for ``history``."""
    from opacus.accountants import RDPAccountant  # Opacus only where local DP runs (see local_dp.train_private)

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))
