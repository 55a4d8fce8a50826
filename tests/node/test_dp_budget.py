"""A node's own privacy budget (node config ``dp-max-epsilon``): no run config can loosen it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resist_fl.node.dp_budget import BudgetRefused, NodeBudget, epsilon_of, spent_history
from resist_fl.node.dp_ledger import ledger_path, partition_ledgers, partition_lock, write_history
from resist_fl.run.outputs import NODES_FILE, read_metrics
from simulations.inprocess import run_inprocess

LOCAL_DP = {"stage-depths": "1,1,7,1", "capacity-measure": "blocks", "local-steps": 2, "dp": "local",
            "norm": "groupnorm", "weighting": "uniform", "dp-noise-multiplier": 1.1, "dp-clip": 1.0}


@pytest.mark.parametrize("node_config, message", [
    ({"dp-max-epsilon": 0, "partition-id": 0}, "dp-max-epsilon = 0: expected a number > 0"),
    ({"dp-max-epsilon": "8", "partition-id": 0}, "dp-max-epsilon = '8': expected a number > 0"),
    ({"dp-max-epsilon": 8, "dp-max-epsilon-delta": 1.0, "partition-id": 0}, "dp-max-epsilon-delta = 1.0"),
    ({"dp-max-epsilon-delta": 1e-6, "partition-id": 0}, "without dp-max-epsilon"),
    ({"dp-max-epsilon": 8}, "needs an integer partition-id"),
])
def test_a_bad_node_budget_is_refused_with_its_value(node_config, message):
    with pytest.raises(ValueError, match=message):
        NodeBudget.of(node_config)


def test_no_budget_without_the_key_and_the_default_delta():
    assert NodeBudget.of({"partition-id": 0}) is None
    assert NodeBudget.of({"partition-id": 0, "dp-max-epsilon": 8}) == NodeBudget(8.0, 1e-5)


def test_the_budget_refuses_a_run_without_local_dp_and_a_round_that_would_exceed_it():
    budget = NodeBudget(2.0, 1e-5)
    with pytest.raises(BudgetRefused, match="trains only under dp='local', and the run has dp = 'central'"):
        budget.check_train("central", [], (1.0, 0.1, 1))
    small = (1.1, 0.05, 2)
    assert budget.check_train("local", [], small) == pytest.approx(epsilon_of([small], 1e-5))
    with pytest.raises(BudgetRefused, match="noise multiplier 0.01"):  # a server lowering the noise
        budget.check_train("local", [], (0.01, 0.05, 2))
    with pytest.raises(BudgetRefused, match="evaluate"):
        budget.refuse_evaluate()


def _run(config: dict, budget: float | None, ledgers: Path) -> tuple[list[dict], list[dict]]:
    node = {"dp-ledger-dir": str(ledgers), **({"dp-max-epsilon": budget} if budget is not None else {})}
    run_inprocess(config, num_nodes=2, node_configs=[{"partition-id": i, "num-partitions": 2, **node} for i in (0, 1)],
                  raise_client_errors=False)
    run_dir = Path(config["output-dir"]) / config["run-name"]
    return read_metrics(run_dir), read_metrics(run_dir, NODES_FILE)


def test_a_node_spends_no_more_than_its_budget_over_every_run(tiny_config, tmp_path):
    """A first run (no budget) spends one round; a budget between one and two rounds' epsilon then refuses
    every round of a second run under another run-name; a budget of two rounds lets one more through."""
    ledgers = tmp_path / "ledgers"
    config = {**tiny_config, **LOCAL_DP}
    _run({**config, "num-server-rounds": 1, "run-name": "first"}, None, ledgers)
    one_round = spent_history({"partition-id": 0, "dp-ledger-dir": str(ledgers)})
    e1, e2, e3 = (epsilon_of(one_round * k, 1e-5) for k in (1, 2, 3))
    assert 0 < e1 < e2 < e3

    rows, nodes = _run({**config, "num-server-rounds": 2, "run-name": "second"}, (e1 + e2) / 2, ledgers)
    assert [(r["replies-accepted"], r["replies-failed"]) for r in rows] == [(0, 2), (0, 2)]
    assert not list(ledgers.glob("run-second--*"))  # nothing trained, nothing charged

    rows, nodes = _run({**config, "num-server-rounds": 2, "run-name": "third"}, (e2 + e3) / 2, ledgers)
    assert [(r["replies-accepted"], r["replies-failed"]) for r in rows] == [(2, 0), (0, 2)]
    spent = spent_history({"partition-id": 1, "dp-ledger-dir": str(ledgers)})
    assert epsilon_of(spent, 1e-5) == pytest.approx(e2) and e2 <= (e2 + e3) / 2
    assert len(json.loads(next(ledgers.glob("run-third--partition-1.json")).read_text())["history"]) >= 1


def test_a_node_with_a_budget_sends_nothing_to_a_run_without_local_dp(tiny_config, tmp_path):
    config = {**tiny_config, "stage-depths": "1,1,7,1", "capacity-measure": "blocks", "local-steps": 2,
              "num-server-rounds": 1, "run-name": "plain", "fraction-evaluate": 1.0, "strategy": "fedavg"}
    rows, _ = _run(config, None, tmp_path / "ledgers")
    assert rows[0]["replies-accepted"] == 2 and rows[0]["client-eval-loss"] > 0  # without a budget: both answered
    rows, _ = _run({**config, "run-name": "budgeted"}, 8.0, tmp_path / "ledgers")
    assert rows[0]["replies-accepted"] == 0 and rows[0]["replies-failed"] == 2
    assert "client-eval-loss" not in rows[0]  # the evaluate messages were refused as well


def test_a_partitions_ledgers_are_every_run_of_that_partition_and_no_other(tmp_path):
    node = {"partition-id": 1, "dp-ledger-dir": str(tmp_path)}
    mine = [ledger_path(node, "a", 5, 7), ledger_path(node, "", 6, 7)]  # a named run and an unnamed one
    others = [ledger_path({**node, "partition-id": 10}, "a", 5, 7),  # partition 10, and a node without a partition
              ledger_path({"dp-ledger-dir": str(tmp_path)}, "a", 5, 1)]
    for i, path in enumerate(mine + others):
        write_history(path, [(1.0, 0.1, i + 1)])
    assert partition_ledgers(node) == sorted(mine)
    assert sorted(steps for _, _, steps in spent_history(node)) == [1, 2]
    assert partition_ledgers({**node, "dp-ledger-dir": str(tmp_path / "absent")}) == []


def test_a_partitions_lock_keeps_a_second_holder_waiting(tmp_path):
    """Two runs training the same partition: the second passes the budget check only after the first wrote."""
    import threading

    node = {"partition-id": 2, "dp-ledger-dir": str(tmp_path)}
    second_in = []

    def second():
        with partition_lock(node):
            second_in.append(len(spent_history(node)))
    with partition_lock(node):
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and second_in == []  # still waiting for the lock
        write_history(ledger_path(node, "first", 1, 1), [(1.0, 0.1, 3)])
    waiting.join(timeout=10)
    assert second_in == [1]  # it saw the first holder's ledger
    with partition_lock({**node, "partition-id": 3}):  # another partition's lock is another lock
        pass
