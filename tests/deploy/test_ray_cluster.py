"""A flwr run simulation on an existing Ray cluster: a head and a second Ray node on loopback, the
ClientApp actors placed on both (read from Ray's own records), every process stopped by PID."""

from __future__ import annotations

import pytest

from resist_fl.run.outputs import read_metrics
from simulations.launcher import run_flwr
from deploy.ray_cluster import LocalRayCluster, RayUnavailable
from tests.apps.test_flwr_run import ROOT, TINY

pytestmark = pytest.mark.slow  # two Ray nodes and the real flwr run engine


def test_a_simulation_joins_a_two_node_ray_cluster_and_uses_both(tmp_path):
    cluster = LocalRayCluster(nodes=2, cpus_per_node=1)
    try:
        cluster.__enter__()
    except RayUnavailable as err:
        pytest.skip(f"ray start is impossible on this machine: {err}")
    try:
        nodes = cluster.wait_for_nodes()
        assert sorted(next(k for k in n["Resources"] if k.startswith("node-")) for n in nodes) == ["node-0", "node-1"]
        config = {**TINY, "min-train-nodes": 2, "min-available-nodes": 2, "output-dir": str(tmp_path / "runs"),
                  "run-name": "on-the-cluster"}
        result = run_flwr(ROOT, config, num_supernodes=2, num_cpus_per_client=1, timeout_s=400,
                          workdir=tmp_path / "logs", ray_address=cluster.address)
        assert result.success, f"{result.reason}\n{result.log_path.read_text()[-3000:]}"
        rows = read_metrics(result.run_dir)
        assert [r["round"] for r in rows] == [1, 2] and all(r["replies-accepted"] == 2 for r in rows)
        placed = cluster.actor_placement()  # Ray's GCS actor table: where each ClientApp actor ran
        assert {label for label, _ in placed} == {"node-0", "node-1"}, placed
        log = result.log_path.read_text()
        for label, pid in placed:  # and each of them ran the ClientApp (its log lines carry the actor's pid)
            assert f"(ClientAppActor pid={pid})" in log and "resist-fl node: training on cpu" in log, (label, pid)
        print("Ray placement:", placed)
    finally:
        signalled, alive = cluster.stop()
    assert signalled and not alive  # every process of the cluster, by PID
