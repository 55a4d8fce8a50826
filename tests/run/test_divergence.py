"""The divergence warning: fires on a loss jump or a non-finite loss, silent on a normal run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.app import identity_handler, train_handler
from resist_fl.run.divergence import DIVERGENCE_FACTOR, divergence_reason
from resist_fl.run.outputs import read_metrics
from simulations.inprocess import run_inprocess


@pytest.mark.parametrize(("earlier", "loss", "fires"), [
    ([], 2.3, False),
    ([2.3, 1.1, 0.8], 0.9, False),                    # noise
    ([2.3, 1.1, 0.8], 3.9, False),                    # 4.9x the best: not yet
    ([1.18, 1.14, 0.76], 48.2, True),                 # the run, round 4
    ([2.3, None, 0.5], 2.6, True),                    # rounds without replies are skipped
    ([2.3, 0.5], math.nan, True),
    ([], math.inf, True),
    ([2.3, 0.5], None, False),                        # no accepted reply: nothing to judge
    ([0.0], 1.0, False),                              # a zero best loss cannot be multiplied
    ([0.64, 0.1, 0.004], 0.02, False),                # 5x a near-zero loss: noise, below the margin
    ([0.64, 0.14], 1.55, True),                       # 11x and 1.4 nats up: the 50-step run's round 5
])
def test_divergence_reason(earlier, loss, fires):
    assert (divergence_reason(earlier, loss) is not None) == fires


def test_the_reason_names_the_jump():
    reason = divergence_reason([1.18, 1.14, 0.76], 48.2)
    assert "48.2" in reason and "63.4x" in reason and "0.76" in reason
    assert DIVERGENCE_FACTOR == 5.0


JUMP_ROUND = 3
jumping_app = ClientApp()
jumping_app.query()(identity_handler)


@jumping_app.train()
def _jumping_train(msg: Message, context: Context) -> Message:
    """The real training, but every node reports a 100x loss in round JUMP_ROUND."""
    reply = train_handler(msg, context)
    if int(msg.content["config"]["server-round"]) == JUMP_ROUND:
        reply.content["metrics"]["train-loss"] *= 100
    return reply


@pytest.mark.parametrize("client", ["normal", "jumping"])
def test_the_servers_warning_and_flag(tiny_config, caplog, client):
    tiny_config["num-server-rounds"] = 4
    run_inprocess(tiny_config, num_nodes=2, **({"client": jumping_app} if client == "jumping" else {}))
    rows = read_metrics(Path(tiny_config["output-dir"]) / "test")
    flagged = [r["round"] for r in rows if r["diverging"]]
    warned = [r for r in caplog.records if "the run may be diverging" in r.getMessage()]
    if client == "normal":
        assert flagged == [] and warned == []
    else:
        assert flagged == [JUMP_ROUND]
        assert len(warned) == 1 and warned[0].levelname == "WARNING"
        message = warned[0].getMessage()
        assert f"[round {JUMP_ROUND}]" in message and "norm='groupnorm'" in message


def test_non_finite_replies_are_a_divergence():
    assert "2 node(s) sent a non-finite" in divergence_reason([1.0], None, non_finite_replies=2)
    assert divergence_reason([1.0], 0.9, non_finite_replies=0) is None


def test_a_node_whose_training_goes_nan_is_reported_not_crashed(tiny_config, caplog):
    """lr = 1e6 makes every node's loss NaN: the nodes say so (no arrays), the server warns each round."""
    tiny_config.update({"num-server-rounds": 2, "lr": 1e6, "lr-schedule": "constant"})
    grid = run_inprocess(tiny_config, num_nodes=2)
    rows = read_metrics(Path(tiny_config["output-dir"]) / "test")
    assert [(r["replies-non-finite"], r["replies-accepted"], r["diverging"]) for r in rows] == [(2, 0, 1)] * 2
    assert sum("the run may be diverging" in r.getMessage() for r in caplog.records) == 2
    assert not any(r.has_error() for r in grid.replies)  # the ClientApp did not raise
