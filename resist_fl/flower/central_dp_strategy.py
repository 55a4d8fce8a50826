"""Client-level central DP as a wrapper over any strategy of the shared round.

Flower's ``DifferentialPrivacyServerSideFixedClipping(strategy, ...)`` is the shape: the wrapped
strategy plans, sends and screens its round as always; :class:`CentrallyPrivate` adds what central
DP needs and nothing else (the substance is :class:`~resist_fl.flower.central_dp.CentralDP`: the
norm check, the holder-calibrated noisy merge and the accountant; the node clips its update,
:func:`~resist_fl.flower.client_side.train_reply`):

- before a round is sent, the accountant may stop the run (``dp-target-epsilon``), and every
  message carries ``dp-clip``;
- the screening rejects a reply whose update exceeds ``dp-clip`` (on top of every other rule);
- the holders of each element are the nodes it was *sent* to (a missing or rejected reply is a zero
  update: ``h`` is a fact of the server's dealing, never of client data), and so are the keys
  ``privacy-min-holders`` withholds (fewer nodes *sent* them, not fewer valid replies), the merge is the noised
  sum over them divided by ``h``, and every round is released (whether the model moves must not
  depend on how many replies were valid);
- each round's release is charged to the nodes it was sent to, and every node's report and the
  round's row carry the epsilon figures.

No strategy has a DP branch; any method of the registry runs privately through this class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from resist_fl.core.holders import holder_counts
from resist_fl.flower.array_codec import array_view
from resist_fl.flower.central_dp import BELOW_CLIP, CentralDP
from resist_fl.flower.message_keys import DP_CLIP, DP_COUNT_BELOW
from resist_fl.flower.round_report import RoundReport
from resist_fl.flower.round_skeleton import SubModelStrategy


class CentrallyPrivate(Strategy):
    """``strategy`` under client-level central DP with the mechanism and accountant ``dp``.

    The wrapped strategy must have been built with ``dp='central'`` settings (its replies then carry
    no loss or times, and its sampler is secret exactly when ``dp.secret``).
    """

    def __init__(self, strategy: SubModelStrategy, dp: CentralDP) -> None:
        if not strategy.private or strategy.settings.dp != "central":
            raise ValueError(f"{strategy.label}: build it with dp='central' settings before wrapping it in "
                             "CentrallyPrivate (its replies must carry no loss or times)")
        if strategy.sampler.secret != dp.secret:
            raise ValueError(f"dp-sampling = {dp.sampling!r} but the strategy's sampler is "
                             f"{'secret' if strategy.sampler.secret else 'public'}: build both from one RunSettings")
        self.strategy, self.dp = strategy, dp
        self.last_release: dict[str, Any] = {}

    # -- what a recorder reads: the wrapped strategy's, plus the privacy figures -----------------
    @property
    def sampler(self):
        return self.strategy.sampler

    @property
    def label(self) -> str:
        return self.strategy.label

    def inference_scales(self) -> dict[str, float]:
        return self.strategy.inference_scales()

    def evaluation_outputs(self, model: Any) -> Any:
        return self.strategy.evaluation_outputs(model)

    def resume_after(self, completed_rounds: int, last_row: Mapping[str, Any] | None) -> None:
        """The wrapped strategy continues; the accountant continues from the last row's ``dp-state``."""
        self.strategy.resume_after(completed_rounds, last_row)
        if last_row:
            self.dp.restore(last_row.get("dp-state"))

    def round_report(self) -> RoundReport:
        """The wrapped strategy's report with each node's epsilon and the round's release figures."""
        report = self.strategy.round_report()
        nodes = {n: replace(r, epsilon=self.dp.node_epsilon(self.sampler.key(n))) for n, r in report.nodes.items()}
        return replace(report, nodes=nodes, privacy={**report.privacy, **self.last_release})

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t└──> central DP: clip %g, noise multiplier %g, delta %g, %s sampling", self.dp.clip,
            self.dp.noise_multiplier, self.dp.delta, self.dp.sampling)

    # -- the round ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, each with ``dp-clip``; none when the next release would
        exceed ``dp-target-epsilon`` (:class:`~resist_fl.flower.round_report.RunStops`)."""
        self.last_release = self.dp.figures()  # a round sent to nobody: the standing figures, nothing charged
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        inner = self.strategy
        self.dp.stop_if_exceeded(len(inner.sampled), inner.connected, inner.round_offset + server_round)
        for message in messages:
            message.content["config"][DP_CLIP] = self.dp.clip
            if self.dp.adaptive:
                message.content["config"][DP_COUNT_BELOW] = True
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen (with the norm check), merge with noise over the holders sent each element, release."""
        inner = self.strategy
        screened = inner.screen(server_round, replies, check=self.check)
        settled = inner.settle(server_round, screened, inner.plans, holders_by_dealing=True)  # sent, not accepted
        sent = {n: {k: i for k, i in p.holding.items() if k not in settled.withheld} for n, p in inner.plans.items()}
        shapes = {k: tuple(v.shape) for k, v in inner.global_record.items()}
        counts = holder_counts(shapes, sent)
        current = {k: array_view(inner.global_record[k]) for k in counts}
        merged = self.dp.merge(current, [u.arrays for u in settled.updates], counts,
                               [u.plan.holding for u in settled.updates])
        self.last_release = self.dp.release_row(
            [self.sampler.key(n) for n in inner.plans], inner.connected,
            [int(a.metrics[BELOW_CLIP]) for a in settled.accepted if BELOW_CLIP in a.metrics])
        return inner.finish(server_round, settled, current, merged)

    def check(self, reply) -> None:
        """The norm check of one screened reply against the arrays its node was sent."""
        self.dp.check_reply(reply.update, self.strategy.received(reply.node_id), reply.metrics)

    # -- evaluation: refused under DP by the settings; what the wrapped strategy does otherwise ------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
